//! Throughput of the AMX tile kernel at the shapes of SmolLM2-135M's layers
//! (a figure, not a check):
//!
//!     cargo run --release -p kvembed-model --example amx_throughput
//!
//! Per shape: the whole product (bf16 conversion included, on rayon's
//! threads), the tile kernel alone on one thread, and the kernel alone with
//! its results written to one small cache-resident buffer. The gap between
//! the last two is what writing the output costs.

fn main() {
    let threads = rayon::current_num_threads();
    for (m, n, k) in [
        (2048, 1536, 576),
        (2048, 576, 1536),
        (2048, 576, 576),
        (8192, 1536, 576),
    ] {
        match kvembed_model::amx::throughput(m, n, k, 5) {
            Some([full, alone, no_output]) => println!(
                "m {m} n {n} k {k}: matmul {full:.0} GFLOP/s on {threads} threads; kernel alone on one thread \
                 {alone:.0}; without output traffic {no_output:.0}"
            ),
            None => {
                eprintln!("AMX-BF16 is not available on this CPU");
                std::process::exit(1);
            }
        }
    }
}

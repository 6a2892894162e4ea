//! Fault injection for the reliability tests: a fault armed by
//! `Request::Fault` (`kv_debug_fault()` in SQL) is carried out by the next
//! embedding batch inside the inference thread.

use kvembed_proto::Fault;
use std::time::Duration;

use crate::log;
use crate::state::Shared;

/// Carries out an armed fault inside the inference thread.
pub(crate) fn inject(fault: Option<Fault>) {
    match fault {
        None => {}
        Some(Fault::Stall { ms }) => {
            log(&format!("injected fault: stalling this batch for {ms} ms"));
            std::thread::sleep(Duration::from_millis(ms));
        }
        Some(Fault::Panic) => panic!("injected fault (kv_debug_fault('panic'))"),
        Some(Fault::Abort) => {
            log("injected fault: aborting the process");
            std::process::abort();
        }
    }
}

/// Arms `fault` for the next embedding batch, if this server was started
/// with `--allow-faults`; otherwise says why not.
pub(crate) fn arm(shared: &Shared, fault: Fault) -> std::result::Result<(), String> {
    if !shared.opts.allow_faults {
        return Err(
            "fault injection is off in this engine (it was started without --allow-faults; \
                    in PostgreSQL: kvembed.debug_faults = on)"
                .into(),
        );
    }
    log(&format!(
        "fault armed for the next embedding batch: {fault:?}"
    ));
    *shared.fault.lock() = Some(fault);
    Ok(())
}

//! Embeddings written as NumPy `.npy` files (format version 1.0), so that
//! vectors can be analysed with `numpy.load` without any Rust-side tooling.
//!
//! The header is byte-for-byte what `numpy.save` writes for a C-ordered
//! little-endian float32 matrix, including numpy's spare padding after the
//! dictionary that lets a writer later grow the first dimension in place.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Magic (6) + version (2) + header length (u16, 2).
const PREAMBLE_LEN: usize = 10;
/// numpy aligns the start of the data to 64 bytes.
const ALIGN: usize = 64;
/// numpy reserves room for a first dimension of up to this many digits.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// Writes `rows` as an `(n, dim)` `<f4` array to `path`.
///
/// An empty slice is written with shape `(0, 0)`.
///
/// # Errors
/// `InvalidInput` if the rows have different lengths (checked before the file
/// is created); otherwise any I/O error from creating or writing the file.
pub fn write_npy_f32(path: &Path, rows: &[Vec<f32>]) -> io::Result<()> {
    let dim = common_dim(rows)?;
    let mut out = BufWriter::new(File::create(path)?);
    write_npy(&mut out, rows, dim)?;
    out.flush()
}

/// The bytes of the `.npy` file [`write_npy_f32`] would write.
///
/// # Errors
/// `InvalidInput` if the rows have different lengths.
#[cfg(test)]
pub fn to_npy_bytes(rows: &[Vec<f32>]) -> io::Result<Vec<u8>> {
    let dim = common_dim(rows)?;
    let mut buf = Vec::with_capacity(2 * ALIGN + rows.len() * dim * 4);
    write_npy(&mut buf, rows, dim)?;
    Ok(buf)
}

fn common_dim(rows: &[Vec<f32>]) -> io::Result<usize> {
    let dim = rows.first().map_or(0, Vec::len);
    match rows.iter().position(|r| r.len() != dim) {
        None => Ok(dim),
        Some(i) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "row {i} has length {} but row 0 has length {dim}",
                rows[i].len()
            ),
        )),
    }
}

/// Full header: preamble, dictionary, padding spaces and the final newline.
fn header(n: usize, dim: usize) -> io::Result<Vec<u8>> {
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {dim}), }}");
    dict.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(n.to_string().len())));
    // +1 for the newline; numpy pads with a full 64 when already aligned.
    let unpadded = PREAMBLE_LEN + dict.len() + 1;
    let pad = ALIGN - unpadded % ALIGN;
    let header_len = u16::try_from(dict.len() + pad + 1).map_err(|_| {
        // Unreachable for a 2-D shape of usize values, but never write a
        // truncated length.
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "npy header too long for format 1.0",
        )
    })?;

    let mut out = Vec::with_capacity(unpadded + pad);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');
    debug_assert_eq!(out.len() % ALIGN, 0);
    Ok(out)
}

fn write_npy<W: Write>(out: &mut W, rows: &[Vec<f32>], dim: usize) -> io::Result<()> {
    out.write_all(&header(rows.len(), dim)?)?;
    // One reusable row buffer: explicit little-endian conversion keeps the
    // output correct on big-endian hosts without unsafe byte casts.
    let mut bytes = Vec::with_capacity(dim * 4);
    for row in rows {
        bytes.clear();
        bytes.extend(row.iter().flat_map(|x| x.to_le_bytes()));
        out.write_all(&bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Vec<Vec<f32>> {
        vec![vec![0.0, 1.0, 2.0], vec![3.0, -4.5, f32::MAX]]
    }

    #[test]
    fn header_bytes_for_2x3() {
        let bytes = to_npy_bytes(&sample()).unwrap();
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        // 10 + 59 + 20 growth spaces + 38 alignment spaces + '\n' = 128.
        let mut expected = b"\x93NUMPY\x01\x00".to_vec();
        expected.extend_from_slice(&118u16.to_le_bytes());
        expected.extend_from_slice(dict.as_bytes());
        expected.extend_from_slice(&[b' '; 58]);
        expected.push(b'\n');
        assert_eq!(expected.len(), 128);
        assert_eq!(&bytes[..128], &expected[..]);
        assert_eq!(bytes.len(), 128 + 2 * 3 * 4);
    }

    #[test]
    fn data_is_little_endian_row_major() {
        let rows = sample();
        let bytes = to_npy_bytes(&rows).unwrap();
        let data: Vec<f32> = bytes[128..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(data, rows.concat());
    }

    #[test]
    fn header_is_aligned_for_many_shapes() {
        for (n, dim) in [
            (0, 0),
            (1, 1),
            (7, 4096),
            (123_456, 384),
            (usize::MAX, usize::MAX),
        ] {
            let h = header(n, dim).unwrap();
            assert_eq!(h.len() % 64, 0, "shape ({n}, {dim})");
            assert_eq!(*h.last().unwrap(), b'\n');
            let declared = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(declared + 10, h.len());
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(text.starts_with(&format!(
                "{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {dim}), }}"
            )));
        }
    }

    #[test]
    fn empty_input_has_shape_0_0() {
        let bytes = to_npy_bytes(&[]).unwrap();
        assert_eq!(bytes.len(), 128);
        assert!(std::str::from_utf8(&bytes[10..])
            .unwrap()
            .contains("'shape': (0, 0)"));
    }

    #[test]
    fn ragged_rows_are_rejected() {
        let err = to_npy_bytes(&[vec![1.0, 2.0], vec![3.0]]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let path =
            std::env::temp_dir().join(format!("kvembed-npy-ragged-{}.npy", std::process::id()));
        let err = write_npy_f32(&path, &[vec![1.0], vec![]]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(!path.exists(), "no file is created for invalid input");
    }

    #[test]
    fn file_matches_bytes() {
        let path =
            std::env::temp_dir().join(format!("kvembed-npy-file-{}.npy", std::process::id()));
        write_npy_f32(&path, &sample()).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(on_disk, to_npy_bytes(&sample()).unwrap());
    }

    /// Round trip through numpy itself. The interpreter is `$KVEMBED_PYTHON`
    /// if set (`scripts/env.sh` sets the venv's, which has numpy), else
    /// `python3`; a missing numpy fails the test rather than passing it.
    #[test]
    fn numpy_reads_it_back() {
        let python = std::env::var("KVEMBED_PYTHON").unwrap_or_else(|_| "python3".to_string());
        let has_numpy = Command::new(&python)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            has_numpy,
            "`{python}` cannot import numpy: run scripts/setup.sh or set KVEMBED_PYTHON"
        );
        let path =
            std::env::temp_dir().join(format!("kvembed-npy-numpy-{}.npy", std::process::id()));
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|i| (0..7).map(|j| (i * 7 + j) as f32 * 0.25 - 3.0).collect())
            .collect();
        write_npy_f32(&path, &rows).unwrap();
        let script = "import io, sys, numpy as np\n\
                      p = sys.argv[1]\n\
                      a = np.load(p)\n\
                      assert a.dtype == np.dtype('<f4'), a.dtype\n\
                      assert a.flags['C_CONTIGUOUS']\n\
                      b = io.BytesIO(); np.save(b, a)\n\
                      same = b.getvalue() == open(p, 'rb').read()\n\
                      print(a.shape[0], a.shape[1], int(same), ' '.join(repr(float(x)) for x in a.ravel()))\n";
        let out = Command::new(&python)
            .args(["-c", script])
            .arg(&path)
            .output()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let fields: Vec<&str> = stdout.split_whitespace().collect();
        assert_eq!(
            &fields[..3],
            &["5", "7", "1"],
            "shape and byte-identical re-save"
        );
        let values: Vec<f32> = fields[3..].iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(values, rows.concat());
    }
}

//! Devices and precisions named on the command line or in a pipeline file.

use anyhow::{bail, Context};
use candle_core::{DType, Device};

pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let Some(rest) = s.strip_prefix("cuda") else {
                bail!("unknown device {s:?}: expected cpu, cuda or cuda:N");
            };
            let ordinal = match rest.strip_prefix(':') {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("bad CUDA ordinal in {s:?}"))?,
                None if rest.is_empty() => 0,
                None => bail!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
            };
            Device::new_cuda(ordinal).with_context(|| format!("opening {s}"))
        }
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => bail!("unknown dtype {s:?}: expected f32, bf16 or f16"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_with_clear_errors() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device"), "{e}");
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64")
            .unwrap_err()
            .to_string()
            .contains("expected f32"));
    }
}

//! Reading GGUF files: typed metadata access and tensors by name.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use super::Result;
use crate::error::ModelError;

/// An open GGUF file: its parsed header and a reader for its tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| ModelError::Gguf(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: metadata and tensor descriptions.
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Gguf(format!("{}: missing `{key}`", self.path.display())))
    }

    /// A metadata string.
    pub fn string(&self, key: &str) -> Result<&str> {
        Ok(self.value(key)?.to_string()?.as_str())
    }

    /// A metadata integer of any width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        let n = match v {
            Value::U8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::I64(x) => *x as i128,
            other => {
                return Err(ModelError::Gguf(format!(
                    "`{key}` is {:?}, not an integer",
                    other.value_type()
                )))
            }
        };
        usize::try_from(n).map_err(|_| ModelError::Gguf(format!("`{key}` = {n} out of range")))
    }

    /// A metadata float.
    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            other => Err(ModelError::Gguf(format!(
                "`{key}` is {:?}, not a float",
                other.value_type()
            ))),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads tensor `name` onto `device`, in its stored (possibly quantized) type.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| ModelError::Gguf(format!("{}: tensor `{name}`: {e}", self.path.display())))
    }
}

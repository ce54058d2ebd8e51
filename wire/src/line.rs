//! Messages on the local sockets are JSON, one per line, each with a size limit: what
//! both the control socket and the console socket read and write.

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("the message is larger than the {limit} bytes allowed")]
    TooLarge { limit: usize },
    #[error("the message is not understood: {0}")]
    Malformed(#[source] serde_json::Error),
}

pub(crate) fn to_line(message: &impl Serialize) -> Vec<u8> {
    // These messages hold numbers, strings and options only: serialising them cannot fail.
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

pub(crate) fn from_line<T: DeserializeOwned>(line: &[u8], limit: usize) -> Result<T, LineError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() > limit {
        return Err(LineError::TooLarge { limit });
    }
    serde_json::from_slice(line).map_err(LineError::Malformed)
}

//! Reading YAML files of one or more documents, with errors that name the file,
//! the line and the object. Every loader (catalog, NodePools, workloads, scenarios)
//! goes through here so that bad input is reported the same way everywhere.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;
use thiserror::Error;

/// A failure to read or decode an input file.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// (The I/O error is in the message, not a `source`, so it is printed once.)
    #[error("{file}: cannot read: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}:{line}: malformed YAML: {message}")]
    Syntax {
        file: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{file}:{line}: {object}: {path}: {message}")]
    Field {
        file: PathBuf,
        line: u64,
        object: String,
        path: String,
        message: String,
    },
    #[error("{file}:{line}: {object}: {message}")]
    Object {
        file: PathBuf,
        line: u64,
        object: String,
        message: String,
    },
}

/// The most documents one input may hold (`---`-separated; a `kind: List` is one).
/// The YAML library's default (1,024) refused `kubectl get -o yaml` output of large
/// clusters; this bound only keeps a separator storm from exhausting memory.
pub const MAX_DOCUMENTS: usize = 100_000;
/// The most YAML nodes (maps, sequences, scalars) one input may hold: about 100,000
/// Deployments as kubectl prints them.
pub const MAX_YAML_NODES: usize = 20_000_000;

/// One YAML document with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: PathBuf,
    /// 1-based line of the document's first node.
    pub line: u64,
    pub value: serde_json::Value,
}

impl Document {
    /// `Kind namespace/name` (or what is known of it), for error messages.
    pub fn describe(&self) -> String {
        describe_object(&self.value)
    }

    /// The document's `kind`, empty when missing.
    pub fn kind(&self) -> &str {
        self.value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
    }

    /// Decode into `T`, naming the field path on failure.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ManifestError> {
        decode_value(&self.value).map_err(|(path, message)| ManifestError::Field {
            file: self.file.clone(),
            line: self.line,
            object: self.describe(),
            path,
            message,
        })
    }

    /// An error about this object as a whole.
    pub fn error(&self, message: impl Into<String>) -> ManifestError {
        ManifestError::Object {
            file: self.file.clone(),
            line: self.line,
            object: self.describe(),
            message: message.into(),
        }
    }

    /// An error about one field of this object.
    pub fn field_error(
        &self,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> ManifestError {
        ManifestError::Field {
            file: self.file.clone(),
            line: self.line,
            object: self.describe(),
            path: path.into(),
            message: message.into(),
        }
    }
}

/// `Kind namespace/name` for an object given as JSON.
pub fn describe_object(value: &serde_json::Value) -> String {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("object");
    if value.get("kind").is_none() && value.get("workloads").is_some() {
        // A scenario file: named at the top level.
        let name = value
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>");
        return format!("scenario {name}");
    }
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Decode a JSON value into `T`; on failure return (field path, message).
pub fn decode_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (
            if path == "." {
                "(top level)".to_string()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })
}

/// Parse YAML text holding one or more documents. `kind: List` documents are expanded
/// into their items (which keep the List's line). Empty documents are skipped.
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<Document>, ManifestError> {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: MAX_DOCUMENTS,
            max_nodes: MAX_YAML_NODES,
            max_events: MAX_YAML_NODES * 4,
        },
    };
    let docs: Vec<Spanned<serde_json::Value>> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            let message = e.to_string();
            // The library's message carries a code snippet; keep the first line only.
            let first = message
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
                .to_string();
            ManifestError::Syntax {
                file: file.to_path_buf(),
                line,
                message: first,
            }
        })?;
    let mut out = Vec::new();
    for doc in docs {
        let line = doc.referenced.line();
        let value = doc.value;
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            out.extend(items.into_iter().map(|item| Document {
                file: file.to_path_buf(),
                line,
                value: item,
            }));
        } else {
            out.push(Document {
                file: file.to_path_buf(),
                line,
                value,
            });
        }
    }
    Ok(out)
}

/// Read manifests as `kubectl -f` does: `-` is standard input; a directory is its
/// `.yaml`, `.yml` and `.json` files in name order (and its subdirectories' with
/// `recursive`); anything else is a file.
pub fn read_source(path: &Path, recursive: bool) -> Result<Vec<Document>, ManifestError> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|error| {
            ManifestError::Read {
                file: path.to_path_buf(),
                error,
            }
        })?;
        return parse_documents(Path::new("<stdin>"), &text);
    }
    if !path.is_dir() {
        return read_documents(path);
    }
    let read_err = |error| ManifestError::Read {
        file: path.to_path_buf(),
        error,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    entries.sort();
    let mut out = Vec::new();
    for entry in entries {
        if entry.is_dir() {
            if recursive {
                out.extend(read_source(&entry, true)?);
            }
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.extend(read_documents(&entry)?);
        }
    }
    Ok(out)
}

/// Read and parse a YAML file.
pub fn read_documents(file: &Path) -> Result<Vec<Document>, ManifestError> {
    let text = std::fs::read_to_string(file).map_err(|error| ManifestError::Read {
        file: file.to_path_buf(),
        error,
    })?;
    parse_documents(file, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_with_lines_and_lists() {
        let text = "kind: A\nmetadata: {name: a}\n---\n# comment\nkind: List\nitems:\n- kind: B\n- kind: C\n---\n";
        let docs = parse_documents(Path::new("x.yaml"), text).unwrap();
        let kinds: Vec<&str> = docs.iter().map(|d| d.kind()).collect();
        assert_eq!(kinds, ["A", "B", "C"]);
        assert_eq!(docs[0].line, 1);
        assert!(docs[1].line >= 4, "line {}", docs[1].line);
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let text = "kind: A\nspec:\n  a: [1, 2\n  b: 3\n";
        let err = parse_documents(Path::new("bad.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.yaml:"), "{err}");
        let line: u64 = err.split(':').nth(1).unwrap().parse().unwrap();
        assert!((3..=5).contains(&line), "{err}");
    }
}

//! The OpenAI-format error body (`{"error":{"message","type","param","code"}}`) with the
//! `type` strings and status codes vLLM uses, so clients see the same errors from us.

use serde::{Deserialize, Serialize};

/// The inner object of an OpenAI error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: u16,
}

/// An error as returned over HTTP: a status code and the body `{"error": ErrorBody}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub body: ErrorBody,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a ErrorBody,
}

impl ApiError {
    pub fn new(status: u16, kind: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                message: message.into(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: status,
            },
        }
    }

    /// A request-validation failure (vLLM's FastAPI layer): `"type":"Bad Request"`,
    /// `param` = `body.<field>`.
    pub fn validation(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(400, "Bad Request", message, param)
    }

    /// A check made by the engine itself: `"type":"BadRequestError"`.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(400, "BadRequestError", message, param)
    }

    /// vLLM's parameter check wording: `"<what>. (parameter=<p>, value=<v>)"`.
    pub fn bad_param(
        what: impl std::fmt::Display,
        param: &str,
        value: impl std::fmt::Display,
    ) -> Self {
        Self::bad_request(
            format!("{what}. (parameter={param}, value={value})"),
            Some(param),
        )
    }

    /// Unknown model: 404 `NotFoundError`, `param` = `model`.
    pub fn model_not_found<S: AsRef<str>>(model: &str, served: &[S]) -> Self {
        let names: Vec<&str> = served.iter().map(|s| s.as_ref()).collect();
        Self::new(
            404,
            "NotFoundError",
            format!(
                "The model `{model}` does not exist. Valid aliases: {}.",
                names.join(", ")
            ),
            Some("model"),
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "PayloadTooLargeError",
            format!("Request body exceeds the limit of {limit} bytes."),
            None,
        )
    }

    pub fn service_unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailableError", message, None)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalServerError", message, None)
    }

    /// The JSON body, `{"error":{...}}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Envelope { error: &self.body })
            .unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status, self.body.kind, self.body.message
        )
    }
}

impl std::error::Error for ApiError {}

/// Parse a JSON request body into `T`, turning every failure into the error vLLM's
/// request validation returns (400, `"type":"Bad Request"`, `param` naming the field).
pub fn parse_json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    parse_json_body_probed::<T, T>(body)
}

/// As [`parse_json_body`], for a `T` with `#[serde(flatten)]`ed fields (where serde loses
/// the field path): when the error has no path, the body is parsed again as `P` (the
/// flattened part) to name the field.
pub fn parse_json_body_probed<T, P>(body: &[u8]) -> Result<T, ApiError>
where
    T: serde::de::DeserializeOwned,
    P: serde::de::DeserializeOwned,
{
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error_lite::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err((path, err)) => {
            if err.classify() == serde_json::error::Category::Data
                && (path.is_empty() || path == ".")
            {
                let de = &mut serde_json::Deserializer::from_slice(body);
                if let Err((p, e)) = serde_path_to_error_lite::deserialize::<_, P>(de) {
                    if !(p.is_empty() || p == ".") {
                        return Err(json_error_to_api(body, &p, &e));
                    }
                }
            }
            Err(json_error_to_api(body, &path, &err))
        }
    }
}

fn json_error_to_api(body: &[u8], path: &str, err: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            let offset = byte_offset(body, err.line(), err.column());
            let loc = format!("body.{offset}");
            ApiError::validation(
                format!(
                    "1 validation error:\n  {{'type': 'json_invalid', 'loc': '{loc}', 'msg': 'JSON decode error', 'ctx': {{'error': '{}'}}}}",
                    strip_position(&err.to_string())
                ),
                Some(&loc),
            )
        }
        Category::Data => {
            let msg = strip_position(&err.to_string());
            // serde reports a missing field at its parent's path; name the field itself.
            let (kind, field) = match msg.strip_prefix("missing field `") {
                Some(rest) => {
                    let name = rest.trim_end_matches('`');
                    let full = if path.is_empty() || path == "." {
                        name.to_string()
                    } else {
                        format!("{path}.{name}")
                    };
                    ("missing", full)
                }
                None => ("invalid_type", path.to_string()),
            };
            let msg = if kind == "missing" {
                "Field required".to_string()
            } else {
                msg
            };
            let loc = if field.is_empty() || field == "." {
                "body".to_string()
            } else {
                format!("body.{field}")
            };
            ApiError::validation(
                format!(
                    "1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}'}}"
                ),
                Some(&loc),
            )
        }
    }
}

fn strip_position(s: &str) -> String {
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

fn byte_offset(body: &[u8], line: usize, column: usize) -> usize {
    let mut cur_line = 1;
    let mut line_start = 0;
    for (i, b) in body.iter().enumerate() {
        if cur_line == line {
            break;
        }
        if *b == b'\n' {
            cur_line += 1;
            line_start = i + 1;
        }
    }
    (line_start + column.saturating_sub(1)).min(body.len())
}

/// A tiny path-tracking deserializer wrapper: records the field path at which a data
/// error happened, so the error can name `body.<field>` as vLLM does.
mod serde_path_to_error_lite {
    pub fn deserialize<'de, D, T>(de: D) -> Result<T, (String, D::Error)>
    where
        D: serde::Deserializer<'de, Error = serde_json::Error>,
        T: serde::Deserialize<'de>,
    {
        let mut track = serde_path_to_error::Track::new();
        let wrapped = serde_path_to_error::Deserializer::new(de, &mut track);
        match T::deserialize(wrapped) {
            Ok(v) => Ok(v),
            Err(e) => {
                let path = track.path().to_string();
                Err((path, e))
            }
        }
    }
}

//! What a handler answers: a status and, but for 204, a JSON body. Every error body is
//! `{"error": "..."}`, one sentence naming the input and the fix.

/// An HTTP response of the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// A JSON document, or none (204).
    pub body: Option<Vec<u8>>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// `status` with `value` serialised as its JSON body.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                body: Some(body),
            },
            Err(e) => Response::error(500, format!("cannot serialise the response: {e}")),
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Response::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

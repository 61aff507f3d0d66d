//! A small client of the dispatcher's HTTP API, with errors that map to exit codes and say
//! what to do.

use std::time::Duration;

use serde_json::Value;

/// How the CLI ends. Codes: 1 refused (a 4xx), 2 bad usage, 3 not found, 4 cluster
/// unreachable or failing, 5 a watched request failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl CliError {
    /// Bad usage (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: message.into(),
        }
    }

    /// The cluster is unreachable or failing (exit 4).
    pub fn unavailable(message: impl Into<String>) -> Self {
        CliError {
            code: 4,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError {
            code: 4,
            message: format!("{e:#}"),
        }
    }
}

/// The API client.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    /// A client of the dispatcher at `base`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(330))
            .build()
            .expect("an HTTP client without TLS always builds");
        Api {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, CliError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| {
            CliError::unavailable(format!(
                "cannot reach the dispatcher at {} ({e}); start a cluster with `updraft up`, or point --api / UPDRAFT_API at a dispatcher",
                self.base
            ))
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| CliError::unavailable(format!("reading the answer: {e}")))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status < 400 {
            return Ok(body);
        }
        let msg = body["error"]["message"]
            .as_str()
            .map(ToString::to_string)
            .unwrap_or_else(|| body.to_string());
        let code = match status {
            401 => 1,
            404 => 3,
            s if s >= 500 => 4,
            _ => 1,
        };
        let hint = match status {
            401 => " (pass the API token with --token or UPDRAFT_TOKEN)",
            429 => " (the shard queue is full: retry later with the same id)",
            s if s >= 500 => " (the cluster is failing; retry shortly)",
            _ => "",
        };
        Err(CliError {
            code,
            message: format!("{msg}{hint}"),
        })
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// POST a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
}

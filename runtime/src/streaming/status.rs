//! The end of a remotecommand session as the client expects it on the
//! error stream: from protocol v4 on a metav1.Status object (the exit code
//! of a non-zero exit in `details.causes`, which kubectl turns into its own
//! exit code); before v4 only a failure is sent, as plain text.

use serde_json::json;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited with this code (0 is success).
    Exited(i32),
    /// The session failed (the process could not be started, the pod went
    /// away): the message for the user.
    Failed(String),
}

impl Outcome {
    /// The metav1.Status JSON of protocol v4 and later.
    pub fn status_json(&self, cmd: &[String]) -> String {
        match self {
            Outcome::Exited(0) => json!({"metadata": {}, "status": "Success"}),
            Outcome::Exited(code) => json!({
                "metadata": {},
                "status": "Failure",
                "message": non_zero_message(cmd, *code),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Failed(message) => json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "InternalError",
                "code": 500,
            }),
        }
        .to_string()
    }

    /// The plain-text error of the protocols before v4 (none on success).
    pub fn error_text(&self, cmd: &[String]) -> Option<String> {
        match self {
            Outcome::Exited(0) => None,
            Outcome::Exited(code) => Some(non_zero_message(cmd, *code)),
            Outcome::Failed(message) => Some(message.clone()),
        }
    }
}

fn non_zero_message(cmd: &[String], code: i32) -> String {
    format!(
        "command terminated with non-zero exit code: error executing command {cmd:?}, exit code {code}"
    )
}

/// A terminal size message of the resize stream (`{"Width":80,"Height":24}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_and_exit_codes_are_statuses() {
        let cmd = vec!["sh".to_string(), "-c".into(), "exit 3".into()];
        let ok: serde_json::Value =
            serde_json::from_str(&Outcome::Exited(0).status_json(&cmd)).unwrap();
        assert_eq!(ok, json!({"metadata": {}, "status": "Success"}));
        let failed: serde_json::Value =
            serde_json::from_str(&Outcome::Exited(3).status_json(&cmd)).unwrap();
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert!(failed["message"]
            .as_str()
            .unwrap()
            .starts_with("command terminated with non-zero exit code"));
        assert_eq!(Outcome::Exited(0).error_text(&cmd), None);
        assert!(Outcome::Exited(3).error_text(&cmd).unwrap().contains("3"));
        let internal: serde_json::Value =
            serde_json::from_str(&Outcome::Failed("boom".into()).status_json(&cmd)).unwrap();
        assert_eq!(internal["message"], "boom");
    }

    #[test]
    fn terminal_sizes_parse() {
        let s: TerminalSize = serde_json::from_str(r#"{"Width":120,"Height":40}"#).unwrap();
        assert_eq!(
            s,
            TerminalSize {
                width: 120,
                height: 40
            }
        );
        assert!(serde_json::from_str::<TerminalSize>(r#"{"Width":-1,"Height":40}"#).is_err());
        assert!(serde_json::from_str::<TerminalSize>("[").is_err());
    }
}

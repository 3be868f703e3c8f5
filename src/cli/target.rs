//! `wxrelay target check NAME`: WeChat's GET URL check, sent to a
//! `format = "wechat"` target and signed with the target's own Token, as
//! WeChat would send it when an admin saves a server URL. A target that
//! echoes `echostr` holds the Token the relay will sign its deliveries with;
//! one that does not would refuse them, so the command fails.

use super::{CliError, Report};
use crate::clock::Clock;
use crate::config::Settings;
use crate::deliver;

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum TargetCommand {
    /// Send a `wechat` target WeChat's URL check signed with its own Token.
    Check {
        /// The target, as configured under [targets.NAME].
        name: String,
    },
}

pub async fn run(
    settings: &Settings,
    command: &TargetCommand,
    clock: &dyn Clock,
) -> Result<Report, CliError> {
    let TargetCommand::Check { name } = command;
    let target = settings.targets.get(name).ok_or_else(|| {
        let names: Vec<&str> = settings.targets.keys().map(String::as_str).collect();
        CliError::Usage(format!(
            "no target {name:?} in the configuration (it has: {})",
            names.join(", ")
        ))
    })?;
    let server = target.wechat.as_ref().ok_or_else(|| {
        CliError::Usage(format!(
            "target {name:?} has format = {:?}: only a format = \"wechat\" target has a Token to check",
            target.format.as_str()
        ))
    })?;
    let client = deliver::client();
    let mut report = super::simulate::url_check(
        &client,
        server.token.expose(),
        &target.url,
        clock.now_secs(),
    )
    .await?;
    report.text.push_str(if report.ok {
        "the target holds the Token the relay signs its deliveries with\n"
    } else {
        "the target does not hold the Token the relay signs its deliveries with: \
         enter the target's token in the broker, or fix [targets.NAME]\n"
    });
    Ok(report)
}

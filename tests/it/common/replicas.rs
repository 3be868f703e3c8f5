//! Several real relay processes (`wxrelay serve`, the release or test build of
//! the binary) on one shared spool: started, killed with SIGKILL and started
//! again by the test, each on its own ports and with its own log file.

use super::{free_port, start_binary, Process};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A replica's configuration from its public and admin addresses.
pub type ConfigFor = Box<dyn Fn(SocketAddr, SocketAddr) -> String + Send + Sync>;

pub struct Replica {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    process: Option<Process>,
}

pub struct Replicas {
    replicas: Vec<Replica>,
    config: ConfigFor,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Replicas {
    /// Starts `n` replicas, one after the other, each on the configuration
    /// `config` gives for its addresses and with `env` set.
    pub async fn start(n: usize, env: &[(&str, &str)], config: ConfigFor) -> Replicas {
        let mut replicas = Replicas {
            replicas: Vec::new(),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        for i in 0..n {
            let replica = replicas.launch(i, None).await;
            replicas.replicas.push(replica);
        }
        replicas
    }

    /// Every replica's public address, dead ones included (as a load
    /// balancer's list would be until it notices).
    pub fn publics(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|r| r.public).collect()
    }

    pub fn replica(&self, i: usize) -> &Replica {
        &self.replicas[i]
    }

    /// SIGKILL: no drain, no goodbye to the database.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.replicas[i].process.take() {
            process.0.kill().unwrap();
            process.0.wait().unwrap();
        }
    }

    /// Starts replica `i` again on its addresses.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        let addresses = (self.replicas[i].public, self.replicas[i].admin);
        self.replicas[i] = self.launch(i, Some(addresses)).await;
    }

    /// Writes every running replica's configuration again, as `config` now
    /// gives it, and makes it reload (SIGHUP).
    #[allow(dead_code)] // for the benchmarks
    pub fn reload(&self) {
        for (i, replica) in self.replicas.iter().enumerate() {
            let Some(process) = &replica.process else {
                continue;
            };
            let toml = (self.config)(replica.public, replica.admin);
            std::fs::write(self.config_path(i), toml).unwrap();
            let pid = process.0.id().to_string();
            let hup = std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap();
            assert!(hup.success(), "SIGHUP to replica {i}");
        }
    }

    /// What replica `i` logged so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{i}.toml"))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{i}.log"))
    }

    /// Writes replica `i`'s configuration and runs it until healthy. Fresh
    /// ports can be taken by another process before the relay binds them, so
    /// a failed start is tried again with others, unless `at` fixes them.
    async fn launch(&self, i: usize, at: Option<(SocketAddr, SocketAddr)>) -> Replica {
        let config = self.config_path(i);
        let log = self.log_path(i);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        for _ in 0..3 {
            let (public, admin) = at.unwrap_or_else(|| (free_port(), free_port()));
            std::fs::write(&config, (self.config)(public, admin)).unwrap();
            let args = ["serve".as_ref(), "--config".as_ref(), config.as_os_str()];
            if let Some(process) = start_binary(&args, &env, &log, admin).await {
                return Replica {
                    public,
                    admin,
                    process: Some(process),
                };
            }
        }
        panic!("replica {i} could not start: {}", self.log(i));
    }
}

//! A real `redis-server` (Debian package `redis-server`) on a free loopback port, persistence
//! off, killed on drop; it can be stopped and started again on the same port.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One `redis-server` process.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts it and waits until it answers `PING`.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = Self { port, child: None };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A client for the test's own commands.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("valid url")
    }

    /// Kills it (every key is lost: persistence is off).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends it `signal` (`STOP`: it keeps its connections but answers nothing, like a hung
    /// server; `CONT`: it goes on), through the shell's builtin `kill`.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis running").id();
        let status = Command::new("sh")
            .args(["-c", &format!("kill -{signal} {pid}")])
            .status()
            .expect("run sh");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Starts it (again) on the same port, and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/install-test-deps)");
        self.child = Some(child);
        let client = self.client();
        for _ in 0..500 {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut connection).await;
                if pong.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Runs one command.
    pub async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut connection = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis answers");
        cmd.query_async(&mut connection).await.expect("command ran")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after 20 s.
pub async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    for _ in 0..1000 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

//! The whole service on a loopback listener, for the tests that talk to it through a real
//! socket: stopped gracefully by [`Running::stop`], aborted when dropped.

use std::net::SocketAddr;
use std::time::Duration;

use extension_registry::config::Config;
use extension_registry::server;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Serves `config` on a fresh loopback port.
    pub async fn start(config: &Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, config)
    }

    /// Serves `config` on `listener`, bound ahead when a peer must know the address first.
    pub fn serve(listener: TcpListener, config: &Config) -> Self {
        let app = extension_registry::build(config).expect("configuration builds");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            listener,
            app,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A successful JSON answer, checked against the OpenAPI document.
    pub async fn json(&self, path: &str) -> Value {
        let response = reqwest::get(self.url(path)).await.unwrap();
        let status = response.status();
        assert!(status.is_success(), "{path}: {status}");
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap();
        let route = path.split('?').next().unwrap_or_default();
        crate::app::contract::check("GET", route, status, &headers, &body);
        serde_json::from_slice(&body).unwrap()
    }

    /// Stops the server gracefully and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

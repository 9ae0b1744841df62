//! End-to-end tests of the engine alone (no Python): a real server on port 0 and real
//! client engines over loopback.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientConfig, Compression, Event, Events};
use crate::protocol::ServerLine;
use crate::server::{Server, ServerConfig};
use crate::tls::{TlsClientOptions, TlsSource};

struct Running {
    chat_port: u16,
    file_port: u16,
    /// How clients trust the server: its certificate's pin (`None`: plain text).
    tls: Option<TlsClientOptions>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

/// A server on free ports; with `tls`, a self-signed certificate (clients pin it).
async fn start(data_dir: &std::path::Path, tls: bool) -> Running {
    let config = ServerConfig {
        chat_port: 0,
        file_port: 0,
        data_dir: data_dir.to_owned(),
        tls: tls.then_some(TlsSource::SelfSigned),
        ..ServerConfig::default()
    };
    let server = Server::bind(config).await.expect("binds");
    let chat_port = server.chat_addr().expect("addr").port();
    let file_port = server.file_addr().expect("addr").port();
    let tls = server
        .tls_handle()
        .fingerprint()
        .map(|pin| TlsClientOptions {
            pin: Some(pin),
            ..TlsClientOptions::default()
        });
    let stop = CancellationToken::new();
    let done = tokio::spawn(server.run(stop.clone().cancelled_owned()));
    Running {
        chat_port,
        file_port,
        tls,
        stop,
        done,
    }
}

async fn connect(srv: &Running, name: &str, dir: &std::path::Path) -> (Client, Events) {
    let mut config = ClientConfig::new(name);
    config.chat_port = srv.chat_port;
    config.file_port = srv.file_port;
    config.download_dir = dir.join(name);
    config.tls = srv.tls.clone();
    config.progress = true; // interleaved with the rest; `next` skips them
    let (client, mut events) = Client::connect(config).await.expect("connects");
    let welcome = ServerLine::Welcome { user: name.into() };
    assert_eq!(next(&mut events).await, Event::Line(welcome));
    (client, events)
}

/// The next event that is not a transfer's progress.
async fn next(events: &mut Events) -> Event {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event in time")
            .expect("the stream is open");
        if !matches!(event, Event::Progress { .. }) {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_messages_bob_and_sends_him_a_file() {
    alice_and_bob(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_messages_bob_and_sends_him_a_file_over_tls() {
    alice_and_bob(true).await;
}

async fn alice_and_bob(tls: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start(&dir.path().join("data"), tls).await;
    let (alice, mut alice_events) = connect(&srv, "alice", dir.path()).await;
    let (bob, mut bob_events) = connect(&srv, "bob", dir.path()).await;

    assert_eq!(
        alice.list_users().await.expect("list"),
        vec!["bob".to_owned()]
    );
    alice.msg("bob", "hi  bob").await.expect("msg");
    let private = ServerLine::Private {
        from: "alice".into(),
        text: "hi  bob".into(),
    };
    assert_eq!(next(&mut bob_events).await, Event::Line(private));

    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let path = dir.path().join("data.bin");
    std::fs::write(&path, &body).expect("write");
    assert_eq!(
        alice
            .send_file("bob", &path, Compression::Auto)
            .await
            .expect("send"),
        body.len() as u64
    );
    let incoming = ServerLine::FileIncoming {
        from: "alice".into(),
        filename: "data.bin".into(),
        size: body.len() as u64,
    };
    // The notice (chat socket) and the file (file socket) may be reported in either order.
    let two = [next(&mut bob_events).await, next(&mut bob_events).await];
    assert!(two.contains(&Event::Line(incoming)), "{two:?}");
    let Some(Event::FileReceived {
        path: saved, size, ..
    }) = two
        .into_iter()
        .find(|e| matches!(e, Event::FileReceived { .. }))
    else {
        panic!("bob should have received the file");
    };
    assert_eq!(size, body.len() as u64);
    assert_eq!(std::fs::read(saved).expect("read"), body);
    let ack = ServerLine::Ack {
        recipient: "bob".into(),
        filename: "data.bin".into(),
    };
    assert_eq!(next(&mut alice_events).await, Event::Line(ack));
    let copy = dir.path().join("data").join("received_from_alice_data.bin");
    assert_eq!(std::fs::read(copy).expect("server copy"), body);

    bob.close().await;
    assert_eq!(next(&mut bob_events).await, Event::Disconnected);
    srv.stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), srv.done)
        .await
        .expect("server stops in time")
        .expect("server task");
    assert_eq!(next(&mut alice_events).await, Event::Disconnected);
}

//! The exec protocol at the frame level, as a client other than kube-rs and kubectl may speak
//! it: the v4 fallback, pings answered, frames on channels 1/2/3, a normal close.

use fake_kube::{FakeKube, PodSpec};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn exec_frames(fake: &FakeKube, protocol: &str, script: &str) -> (String, Vec<Message>) {
    let url = format!(
        "{}/api/v1/namespaces/apps/pods/web-0/exec?&command=sh&command=-c&command={}&stdout=true&stderr=true",
        fake.url().replacen("http", "ws", 1),
        script
            .replace(' ', "%20")
            .replace(';', "%3B")
            .replace('>', "%3E")
            .replace('&', "%26")
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    let chosen = response.headers()["sec-websocket-protocol"]
        .to_str()
        .unwrap()
        .to_owned();
    socket
        .send(Message::Ping("are you there".into()))
        .await
        .unwrap();
    let mut frames = Vec::new();
    while let Some(Ok(message)) = socket.next().await {
        let close = matches!(message, Message::Close(_));
        frames.push(message);
        if close {
            break;
        }
    }
    (chosen, frames)
}

fn binary(frames: &[Message], channel: u8) -> Vec<u8> {
    frames
        .iter()
        .filter_map(|m| match m {
            Message::Binary(data) if data.first() == Some(&channel) => Some(data[1..].to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_is_chosen_when_offered_alone_and_pings_are_answered() {
    let fake = FakeKube::start().await;
    fake.add_pod(PodSpec::running("apps", "web-0"));
    let (chosen, frames) = exec_frames(
        &fake,
        "v4.channel.k8s.io",
        "sleep 0.2; echo out; echo err >&2; exit 3",
    )
    .await;
    assert_eq!(chosen, "v4.channel.k8s.io");
    assert!(
        frames
            .iter()
            .any(|m| matches!(m, Message::Pong(p) if &p[..] == b"are you there")),
        "{frames:?}"
    );
    assert_eq!(binary(&frames, 1), b"out\n");
    assert_eq!(binary(&frames, 2), b"err\n");
    let status: serde_json::Value = serde_json::from_slice(&binary(&frames, 3)).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
    match frames.last().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("expected a normal close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_is_preferred_and_success_is_a_plain_status() {
    let fake = FakeKube::start().await;
    fake.add_pod(PodSpec::running("apps", "web-0"));
    let (chosen, frames) = exec_frames(&fake, "v4.channel.k8s.io, v5.channel.k8s.io", "true").await;
    assert_eq!(chosen, "v5.channel.k8s.io");
    let status: serde_json::Value = serde_json::from_slice(&binary(&frames, 3)).unwrap();
    assert_eq!(status["status"], "Success");
}

//! The web console and the API reference page: served from the binary, with headers that keep
//! injected script out and the pages out of frames. (The console's behaviour in a browser is
//! tested by tests/browser/, which drives Chromium.)

mod support;

use support::{Backend, TestDb, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_and_docs_are_served_with_security_headers() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;
    for (page, script) in [("/", "/console/app.js"), ("/docs", "/console/docs.js")] {
        let response = server.client.get(server.url(page)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        let html = response.text().await.unwrap();
        assert!(
            html.contains(&format!("src=\"{script}\"")),
            "{page} loads {script}"
        );
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{page} fetches nothing from elsewhere"
        );
    }
    for asset in [
        "/console/app.js",
        "/console/api.js",
        "/console/ansi.js",
        "/console/stream.js",
        "/console/docs.js",
        "/console/console.css",
    ] {
        let response = server.client.get(server.url(asset)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        let kind = if asset.ends_with(".css") {
            "text/css"
        } else {
            "text/javascript"
        };
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{asset}"
        );
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("innerHTML"),
            "{asset} never parses text as HTML"
        );
    }
    let missing = server
        .client
        .get(server.url("/console/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
}

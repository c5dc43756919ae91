//! The web console at `/` and the API reference at `/docs`: hand-written HTML, CSS and JS
//! modules embedded in the binary (nothing is fetched from elsewhere at run time), served with
//! headers that keep the pages from running injected script or being framed.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tower::ServiceBuilder;
use tower_http::set_header::SetResponseHeaderLayer;

use super::AppState;

/// Scripts, styles and connections only from this origin; no inline script, no plugins, no
/// framing. `style-src 'self'` still allows the colours the ANSI renderer sets through CSSOM.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// One embedded file: its route, its content type and its text.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// An [`Asset`] from a file under `console/`.
macro_rules! asset {
    ($path:literal, $file:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_str!(concat!("console/", $file)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("/", "index.html", HTML),
    asset!("/docs", "docs.html", HTML),
    asset!("/console/console.css", "console.css", CSS),
    asset!("/console/app.js", "app.js", JAVASCRIPT),
    asset!("/console/api.js", "api.js", JAVASCRIPT),
    asset!("/console/ansi.js", "ansi.js", JAVASCRIPT),
    asset!("/console/stream.js", "stream.js", JAVASCRIPT),
    asset!("/console/docs.js", "docs.js", JAVASCRIPT),
];

/// The console's routes (outside the OpenAPI document: they are pages, not API).
pub fn routes() -> Router<AppState> {
    let router = ASSETS.iter().fold(Router::new(), |router, asset| {
        let (content_type, body) = (asset.content_type, asset.body);
        router.route(
            asset.path,
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, content_type),
                        // Assets change with the binary: revalidate rather than serve a stale one.
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    body,
                )
                    .into_response()
            }),
        )
    });
    router.layer(
        ServiceBuilder::new()
            .layer(SetResponseHeaderLayer::overriding(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                header::X_FRAME_OPTIONS,
                HeaderValue::from_static("DENY"),
            ))
            // Stream tokens travel in URLs: never hand them to another site as a referrer.
            .layer(SetResponseHeaderLayer::overriding(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                HeaderName::from_static("cross-origin-opener-policy"),
                HeaderValue::from_static("same-origin"),
            )),
    )
}

//! The browser side, embedded in the binary: the dashboard at `/` with its assets, the client
//! `herald.js` (an ES module), `herald.global.js` (the same code as a classic script that sets
//! `window.herald`, derived from the module at startup) and `herald.d.ts`.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::OriginalUri;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::AppState;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TS: &str = "application/typescript; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// The dashboard may only talk to the hub that served it and load nothing from other hosts.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

const HERALD_JS: &str = include_str!("../../../../web/herald.js");

/// One embedded file.
#[derive(Debug)]
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: String,
    etag: HeaderValue,
    /// Scripts and types are meant for pages of any origin (`<script type="module" src=...>`
    /// fetches with CORS), so they carry `Access-Control-Allow-Origin: *`.
    public: bool,
}

impl Asset {
    fn new(path: &'static str, content_type: &'static str, body: String, public: bool) -> Self {
        let etag = HeaderValue::from_str(&format!("\"{:016x}\"", fnv1a(body.as_bytes())))
            .expect("a hex etag is a valid header value");
        Asset {
            path,
            content_type,
            body,
            etag,
            public,
        }
    }
}

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    vec![
        Asset::new(
            "/index.html",
            HTML,
            include_str!("../../../../web/index.html").into(),
            false,
        ),
        Asset::new(
            "/app.js",
            JS,
            include_str!("../../../../web/app.js").into(),
            false,
        ),
        Asset::new(
            "/app.css",
            CSS,
            include_str!("../../../../web/app.css").into(),
            false,
        ),
        Asset::new(
            "/favicon.svg",
            SVG,
            include_str!("../../../../web/favicon.svg").into(),
            false,
        ),
        Asset::new("/herald.js", JS, HERALD_JS.into(), true),
        Asset::new("/herald.global.js", JS, classic_script(HERALD_JS), true),
        Asset::new(
            "/herald.d.ts",
            TS,
            include_str!("../../../../web/herald.d.ts").into(),
            true,
        ),
    ]
});

/// The routes of the embedded files, merged into the hub's router.
pub(crate) fn routes() -> Router<AppState> {
    let mut router = Router::new().route("/", get(dashboard));
    for asset in ASSETS.iter() {
        router = router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { serve(asset, &headers) }),
        );
    }
    router
}

/// `GET /`: the dashboard. When herald is nested, `/push` is redirected to `/push/index.html`, so
/// the page's relative links (`app.js`, `events`, `stats`) resolve under the nest (axum does not
/// route `/push/` to a nested `/`).
async fn dashboard(OriginalUri(uri): OriginalUri, headers: HeaderMap) -> Response {
    let path = uri.path();
    if !path.ends_with('/') {
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        return Redirect::permanent(&format!("{path}/index.html{query}")).into_response();
    }
    serve(&ASSETS[0], &headers)
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == asset.etag.as_bytes());
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.clone().into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::ETAG, asset.etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.content_type == HTML {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DASHBOARD_CSP),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    if asset.public {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    response
}

/// `herald.js` as a classic script: its one `export { ... };` line (the module's last statement)
/// is dropped and the rest wrapped in a function, so only `window.herald` is left global.
fn classic_script(module: &str) -> String {
    let body = module.trim_end();
    let (code, last) = body.rsplit_once('\n').unwrap_or(("", body));
    assert!(
        last.starts_with("export {") && last.ends_with("};"),
        "herald.js must end with its one `export {{ ... }};` line"
    );
    format!(
        "// herald.global.js: herald.js as a classic script (<script src>); it sets window.herald.\n\
         // Generated by the hub from herald.js; prefer the module: import {{ connect }} from '.../herald.js'.\n\
         (function () {{\n'use strict';\n{code}\n}})();\n"
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_has_one_export_and_no_import() {
        let lines: Vec<&str> = HERALD_JS.lines().collect();
        let exports: Vec<&&str> = lines.iter().filter(|l| l.starts_with("export")).collect();
        assert_eq!(exports.len(), 1, "{exports:?}");
        assert!(!lines.iter().any(|l| l.starts_with("import")));
        assert!(
            !HERALD_JS.contains("import.meta"),
            "a classic script cannot use import.meta"
        );
    }

    #[test]
    fn the_classic_script_keeps_everything_but_the_export() {
        let classic = classic_script(HERALD_JS);
        assert!(!classic.contains("\nexport "));
        assert!(classic.contains("window.herald = herald;"));
        assert!(classic.contains("function connect(url, options = {})"));
        assert!(classic.trim_end().ends_with("})();"));
    }

    #[test]
    fn every_asset_has_a_distinct_path_and_etag() {
        let mut paths: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), ASSETS.len());
        assert_ne!(ASSETS[0].etag, ASSETS[1].etag);
        assert_eq!(ASSETS[0].path, "/index.html");
    }
}

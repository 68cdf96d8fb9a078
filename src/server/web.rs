//! The browser side of Parley: the customer chat widget (`/widget/`) and the agent console
//! (`/agent/`), compiled into the binary from `web/`, and the CORS headers that let a page
//! talk to every instance of the cluster (failing over crosses origins: another port or host).
//!
//! Every request is authorized by a bearer token, never by a cookie, so any origin may call
//! the API: a page learns nothing a stranger's curl would not.

use super::App;
use super::api::Body;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

const CLIENT: &str = include_str!("../../web/client.js");
/// One file for one script tag: the failover client, the transcript view, the widget.
const WIDGET_JS: &str = concat!(include_str!("../../web/client.js"), include_str!("../../web/view.js"), include_str!("../../web/widget/widget.js"));
const WIDGET_PAGE: &str = include_str!("../../web/widget/index.html");
const CONSOLE_JS: &str = concat!(include_str!("../../web/client.js"), include_str!("../../web/view.js"), include_str!("../../web/agent/console.js"));
const CONSOLE_PAGE: &str = include_str!("../../web/agent/index.html");

const PAGE_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self' http: https: ws: wss:; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Where the pages put the cluster's addresses, this instance first.
const INSTANCES_MARK: &str = "%PARLEY_INSTANCES%";

/// The page or script at `path`, if it is one of the web assets.
pub fn asset(app: &App, path: &str) -> Option<Response<Body>> {
    let (content_type, body): (&str, Bytes) = match path {
        "/widget" | "/agent" => {
            let mut r = Response::new(Full::default());
            *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
            r.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&format!("{path}/")).expect("ASCII path"));
            return Some(r);
        }
        "/widget/" => ("text/html; charset=utf-8", WIDGET_PAGE.replace(INSTANCES_MARK, &instances(app)).into()),
        "/agent/" => ("text/html; charset=utf-8", CONSOLE_PAGE.replace(INSTANCES_MARK, &instances(app)).into()),
        "/widget/parley-widget.js" => ("text/javascript; charset=utf-8", Bytes::from_static(WIDGET_JS.as_bytes())),
        "/agent/console.js" => ("text/javascript; charset=utf-8", Bytes::from_static(CONSOLE_JS.as_bytes())),
        "/widget/parley-client.js" => ("text/javascript; charset=utf-8", Bytes::from_static(CLIENT.as_bytes())),
        _ => return None,
    };
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).expect("ASCII"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // The console holds an agent token: only its own scripts run, no page may frame it, and
    // it talks to the cluster's instances (any http/https address, as the operator lists them,
    // and their WebSockets).
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
    Some(r)
}

/// The live instances' addresses as the pages use them: this instance first, then the others.
fn instances(app: &App) -> String {
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    let mut list = vec![format!("{scheme}://{}", app.cluster.address)];
    for peer in app.cluster.members() {
        let url = format!("{scheme}://{}", peer.address);
        if peer.is_live() && !list.contains(&url) {
            list.push(url);
        }
    }
    // The pages read it inside an HTML attribute: addresses are host:port, nothing to escape,
    // but never let a stored address break out of the attribute.
    list.join(" ").replace(['"', '<', '>', '&'], "")
}

/// Headers every answer carries so a page on another origin can read it.
pub fn allow_cross_origin(response: &mut Response<Body>) {
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("parley-instance, retry-after"));
}

/// The answer to a CORS preflight (`OPTIONS`): which methods and headers a page may use.
pub fn preflight() -> Response<Body> {
    let mut r = Response::new(Full::default());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    r
}

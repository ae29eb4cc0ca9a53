//! A headless Chromium driven over WebDriver (W3C, by `chromedriver`),
//! spoken with the suites' reqwest client: enough of the protocol for the
//! UI suite (navigate, find, click, type, read text, run a script, take a
//! screenshot). Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/install-test-deps.sh`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// The key W3C WebDriver names an element reference with.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session; the driver process ends with it.
pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
    /// Chromium's profile, removed at the end.
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromedriver` (on a free loopback port) and a headless
    /// Chromium at 1280×720.
    pub async fn start() -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let driver = Command::new("chromedriver")
            .args([format!("--port={port}"), "--silent".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "chromedriver (Debian's chromium-driver; scripts/install-test-deps.sh installs it)",
            )?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir()?;
        let mut browser = Browser {
            driver,
            base: base.clone(),
            http,
            _profile: profile,
        };
        crate::wait_for("chromedriver", Duration::from_secs(15), || async {
            let r = browser
                .http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            v["value"]["ready"].as_bool().filter(|r| *r).map(|_| ())
        })
        .await?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,720", "--no-first-run", "--disable-extensions",
                         format!("--user-data-dir={}", browser._profile.path().display())]
            }
        }}});
        let session = browser.call("POST", "/session", Some(caps)).await?;
        let id = session["sessionId"]
            .as_str()
            .context("no session id")?
            .to_owned();
        browser.base = format!("{base}/session/{id}");
        Ok(browser)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self
                .http
                .post(&url)
                .json(&body.unwrap_or_else(|| json!({}))),
        };
        let v: Value = request.send().await?.json().await?;
        if let Some(error) = v["value"]["error"].as_str() {
            bail!(
                "webdriver {method} {path}: {error}: {}",
                v["value"]["message"]
            );
        }
        Ok(v["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(json!({"url": url}))).await?;
        Ok(())
    }

    /// The first element `css` selects, if any.
    pub async fn find(&self, css: &str) -> Result<Option<String>> {
        let found = self
            .call(
                "POST",
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .and_then(|a| a.first())
            .and_then(|e| e[ELEMENT].as_str())
            .map(str::to_owned))
    }

    /// Waits (bounded) for `css` to select an element.
    pub async fn wait(&self, css: &str, timeout: Duration) -> Result<String> {
        let found = crate::wait_for(&format!("{css} on the page"), timeout, || async {
            self.find(css).await.ok().flatten()
        })
        .await;
        self.explained(found).await
    }

    /// A failed wait with what the page showed (its text, its URL).
    async fn explained<T>(&self, result: Result<T>) -> Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                let shown = self
                    .script(
                        "return location.href + '\\n' + document.body.innerText.slice(0, 2000);",
                    )
                    .await
                    .map(|v| v.as_str().unwrap_or_default().to_owned())
                    .unwrap_or_else(|e| format!("(the page could not be read: {e})"));
                let console = self
                    .call("POST", "/se/log", Some(json!({"type": "browser"})))
                    .await
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                Err(e.context(format!("the page showed:\n{shown}\nits console: {console}")))
            }
        }
    }

    /// Waits (bounded) until the text of `css` satisfies `ok`; that text.
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let found = crate::wait_for(&format!("the text of {css}"), timeout, || async {
            let el = self.find(css).await.ok().flatten()?;
            let text = self.text(&el).await.ok()?;
            ok(&text).then_some(text)
        })
        .await;
        self.explained(found).await
    }

    pub async fn text(&self, element: &str) -> Result<String> {
        let v = self
            .call("GET", &format!("/element/{element}/text"), None)
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    pub async fn click(&self, element: &str) -> Result<()> {
        self.call("POST", &format!("/element/{element}/click"), None)
            .await?;
        Ok(())
    }

    /// Clears the field and types `text` into it.
    pub async fn fill(&self, element: &str, text: &str) -> Result<()> {
        self.call("POST", &format!("/element/{element}/clear"), None)
            .await?;
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
        )
        .await?;
        Ok(())
    }

    /// Runs `script` in the page (`return …` for a value).
    pub async fn script(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Resizes the window (its CSS viewport: 640×360 is 1280×720 at
    /// 200 % zoom).
    pub async fn resize(&self, width: u32, height: u32) -> Result<()> {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await?;
        Ok(())
    }

    /// Saves a PNG of the page to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self.call("GET", "/screenshot", None).await?;
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("no screenshot")?)?;
        ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Browser {
    /// Ends the session (the browser closes) and the driver.
    pub async fn quit(self) {
        let _ = self.call("DELETE", "", None).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The session's browser ends with its driver.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

//! The object store under a repository, as blocking calls: S3 (Ceph RGW, AWS, any store with
//! its API) through the `object_store` crate on a small runtime of its own, configured the way
//! AWS tools are (environment variables, then the shared credentials and config files), with
//! bounded retries and timeouts. Every failure is one line naming the object.

use super::RepoUrl;
use crate::error::{err, Error, ErrorKind, Result};
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// How a store is reached, beyond the bucket: what `--endpoint` and the environment say.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The store's URL (Ceph RGW: `http://HOST:7480`); default: the AWS variables or files,
    /// else AWS itself.
    pub endpoint: Option<String>,
    /// Attempts after the first for a request that fails for a reason worth retrying.
    pub retries: usize,
    /// No retry is started this long after a request's first attempt.
    pub retry_timeout: Duration,
    /// Longest a single attempt may take.
    pub timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            endpoint: None,
            retries: 3,
            retry_timeout: Duration::from_secs(15),
            timeout: Duration::from_secs(10),
        }
    }
}

impl StoreConfig {
    /// The defaults, changed by `COWDISK_S3_RETRIES`, `COWDISK_S3_RETRY_TIMEOUT` and
    /// `COWDISK_S3_TIMEOUT` (seconds).
    pub fn from_env() -> StoreConfig {
        let mut c = StoreConfig::default();
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = num("COWDISK_S3_RETRIES") {
            c.retries = n as usize;
        }
        if let Some(n) = num("COWDISK_S3_RETRY_TIMEOUT") {
            c.retry_timeout = Duration::from_secs(n);
        }
        if let Some(n) = num("COWDISK_S3_TIMEOUT") {
            c.timeout = Duration::from_secs(n);
        }
        c
    }
}

/// The runtime all stores of the process share: two threads are enough to keep a few
/// requests in flight, which is all a blocking caller does.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cowdisk-s3")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| err(ErrorKind::Io, format!("cannot start the object-store runtime: {e}")))
}

/// One `key = value` section of an AWS shared config or credentials file.
fn ini_section(text: &str, wanted: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            inside = wanted.iter().any(|w| w == line[1..line.len() - 1].trim());
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

/// What the shared AWS files say for the profile in use (AWS_PROFILE, else `default`):
/// credentials, region and endpoint. The `object_store` crate reads only the environment.
fn aws_files() -> HashMap<String, String> {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let file = |var: &str, default: &str| {
        std::env::var_os(var).map(std::path::PathBuf::from).unwrap_or_else(|| home.join(".aws").join(default))
    };
    let mut out = HashMap::new();
    if let Ok(t) = std::fs::read_to_string(file("AWS_CONFIG_FILE", "config")) {
        out.extend(ini_section(&t, &[profile.clone(), format!("profile {profile}")]));
    }
    if let Ok(t) = std::fs::read_to_string(file("AWS_SHARED_CREDENTIALS_FILE", "credentials")) {
        out.extend(ini_section(&t, &[profile]));
    }
    out
}

/// What this process's ranged reads cost (for `serve`'s report at exit, and benchmarks).
#[derive(Debug, Default)]
pub struct Stats {
    pub ranged_gets: AtomicU64,
    pub ranged_bytes: AtomicU64,
    pub ranged_micros: AtomicU64,
    /// Reads served straight from the store because the cache could not take the layer.
    pub uncached_reads: AtomicU64,
    /// Why the cache could not, the first time it could not.
    pub cache_error: std::sync::Mutex<Option<String>>,
    /// The cache failed to take a layer and has not taken one since.
    pub cache_down: std::sync::atomic::AtomicBool,
}

pub static STATS: Stats = Stats {
    ranged_gets: AtomicU64::new(0),
    ranged_bytes: AtomicU64::new(0),
    ranged_micros: AtomicU64::new(0),
    uncached_reads: AtomicU64::new(0),
    cache_error: std::sync::Mutex::new(None),
    cache_down: std::sync::atomic::AtomicBool::new(false),
};

/// Who is told, as it happens, that the cache stopped or started again taking layers (`serve`
/// prints it); nobody until set. The counts go into [`STATS`] either way.
static CACHE_NOTICE: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Sets who is told of the cache's failures and recoveries (once per process).
pub fn on_cache_notice(f: fn(&str)) {
    let _ = CACHE_NOTICE.set(f);
}

pub(crate) fn cache_notice(msg: &str) {
    if let Some(f) = CACHE_NOTICE.get() {
        f(msg);
    }
}

/// Whether an endpoint URL names a user (and maybe a secret) before its host.
fn has_userinfo(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    rest.split(['/', '?', '#']).next().is_some_and(|authority| authority.contains('@'))
}

/// Refuses an endpoint the store's client would misread or print secrets from: one that does
/// not parse as an http or https URL with a host, one with credentials (in any spelling the
/// parser accepts, such as `http:/user:secret@host`, which `has_userinfo` misses and on which
/// the client panicked), and one with a query or fragment (which the client drops, so that a
/// token there was silently not used). No message repeats the endpoint: it may hold a secret.
fn check_endpoint(endpoint: &str) -> Result<()> {
    let refuse = |why: &str| Err(err(ErrorKind::InvalidArgument, format!("the endpoint {why}")));
    let credentials = "has credentials in it (user:secret@): refused, so that no error message prints them; \
                       give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or in ~/.aws/credentials";
    if has_userinfo(endpoint) {
        return refuse(credentials);
    }
    let Ok(u) = url::Url::parse(endpoint) else {
        return refuse("is not a URL (http://HOST:PORT or https://HOST)");
    };
    if !u.username().is_empty() || u.password().is_some() {
        return refuse(credentials);
    }
    if !matches!(u.scheme(), "http" | "https") || u.host_str().map_or(true, str::is_empty) {
        return refuse("must be http://HOST[:PORT] or https://HOST[:PORT]");
    }
    if u.query().is_some() || u.fragment().is_some() {
        return refuse("has a query or fragment (?… or #…), which the S3 client would drop: refused");
    }
    Ok(())
}

/// An open repository.
pub struct Store {
    url: RepoUrl,
    inner: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// One listed object: its key below the repository, size and time of last change.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

impl Store {
    pub fn open(url: &RepoUrl, cfg: &StoreConfig) -> Result<Store> {
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
        let files = aws_files();
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            if let (Some(k), Some(s)) = (files.get("aws_access_key_id"), files.get("aws_secret_access_key")) {
                b = b.with_access_key_id(k).with_secret_access_key(s);
                if let Some(t) = files.get("aws_session_token") {
                    b = b.with_token(t);
                }
            }
        }
        if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            b = b.with_region(files.get("region").map(String::as_str).unwrap_or("us-east-1"));
        }
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            // object_store reads this one itself: looked at here too, so that it is checked.
            .or_else(|| std::env::var("AWS_ENDPOINT").ok())
            .or_else(|| files.get("endpoint_url").cloned());
        if let Some(e) = &endpoint {
            // Credentials in the endpoint would be printed with every error the store's
            // client reports (it names the URL it failed on): refused, with where they go.
            check_endpoint(e)?;
            // A store of one's own (Ceph RGW) answers under its own name, not a bucket's
            // sub-domain, and often over plain HTTP on a private network.
            b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: cfg.retries,
            retry_timeout: cfg.retry_timeout,
        };
        // Plain HTTP only to an endpoint named as such. (This lives in the client options,
        // which `with_client_options` replaces wholesale: the builder's own flag would be lost.)
        // (The scheme as parsed: it is case-insensitive, and check_endpoint lets HTTP:// pass.)
        let http = endpoint.as_deref().is_some_and(|e| url::Url::parse(e).is_ok_and(|u| u.scheme() == "http"));
        let client = ClientOptions::new()
            .with_allow_http(http)
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout.min(Duration::from_secs(5)));
        let inner = b.with_retry(retry).with_client_options(client).build().map_err(|e| {
            err(ErrorKind::InvalidArgument, one_line(&e.to_string())).with_file(std::path::Path::new(&url.to_string()))
        })?;
        Ok(Store { url: url.clone(), inner: Arc::new(inner) })
    }

    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    fn path(&self, key: &str) -> ObjPath {
        ObjPath::from(self.url.key(key))
    }

    fn fail(&self, key: &str, op: &'static str, e: object_store::Error) -> Error {
        let name = std::path::PathBuf::from(format!("{}/{key}", self.url));
        let kind = match &e {
            object_store::Error::NotFound { .. } => ErrorKind::ParentMissing,
            object_store::Error::AlreadyExists { .. } => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        let msg = match kind {
            ErrorKind::ParentMissing => "not in the repository".to_string(),
            _ => one_line(&e.to_string()),
        };
        err(kind, msg).with_file(&name).during(op)
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T> {
        Ok(runtime()?.block_on(f))
    }

    /// The whole object at `key`.
    pub fn get(&self, key: &str) -> Result<Bytes> {
        let p = self.path(key);
        self.block_on(async { self.inner.get(&p).await?.bytes().await })?.map_err(|e| self.fail(key, "get", e))
    }

    /// Bytes `range` of the object at `key`, or fewer: an object that ends inside the range
    /// (truncated in the store) gives the bytes it has, and the caller checks what it needs.
    /// One that ends before the range starts is an error. So records wholly before a cut still
    /// arrive when a ranged GET of several runs past it, whichever of them a read asked for
    /// first (an error there made good chunks fail, depending on how reads were grouped).
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let p = self.path(key);
        let want = range.end - range.start;
        let t = std::time::Instant::now();
        let b = self.block_on(self.inner.get_range(&p, range))?.map_err(|e| self.fail(key, "get", e))?;
        STATS.ranged_gets.fetch_add(1, Ordering::Relaxed);
        STATS.ranged_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        STATS.ranged_micros.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        if b.len() as u64 > want {
            return Err(err(ErrorKind::Corrupt, format!("asked for {want} bytes, got {}", b.len()))
                .with_file(std::path::Path::new(&format!("{}/{key}", self.url))));
        }
        Ok(b)
    }

    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let p = self.path(key);
        self.block_on(self.inner.put(&p, PutPayload::from(bytes)))?.map(|_| ()).map_err(|e| self.fail(key, "put", e))
    }

    /// Writes `key` unless it exists; returns whether it was written.
    pub fn put_new(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        let p = self.path(key);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.block_on(self.inner.put_opts(&p, PutPayload::from(bytes), opts))? {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.fail(key, "put", e)),
        }
    }

    /// Writes the objects in the background, one after another (each only once the one before
    /// it is stored); the handle reports how it went.
    pub fn put_then(&self, objects: Vec<(String, Vec<u8>)>) -> Result<tokio::task::JoinHandle<Result<()>>> {
        let (inner, url) = (self.inner.clone(), self.url.clone());
        let objects: Vec<(ObjPath, String, Vec<u8>)> =
            objects.into_iter().map(|(k, b)| (self.path(&k), k, b)).collect();
        Ok(runtime()?.spawn(async move {
            for (p, k, bytes) in objects {
                inner.put(&p, PutPayload::from(bytes)).await.map_err(|e| {
                    err(ErrorKind::Io, one_line(&e.to_string()))
                        .with_file(std::path::Path::new(&format!("{url}/{k}")))
                        .during("put")
                })?;
            }
            Ok(())
        }))
    }

    /// Waits for a background write.
    pub fn wait(&self, h: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
        self.block_on(h)?.map_err(|e| err(ErrorKind::Io, format!("an upload stopped: {e}")))?
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        let p = self.path(key);
        match self.block_on(self.inner.head(&p))? {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fail(key, "head", e)),
        }
    }

    /// When the store last wrote `key` (by its own clock), or `None` if there is no `key`.
    pub fn modified(&self, key: &str) -> Result<Option<SystemTime>> {
        let p = self.path(key);
        match self.block_on(self.inner.head(&p))? {
            Ok(m) => Ok(Some(SystemTime::from(m.last_modified))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(key, "head", e)),
        }
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key);
        match self.block_on(self.inner.delete(&p))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(key, "delete", e)),
        }
    }

    /// Every object whose key starts with `dir/`, keys given below the repository.
    pub fn list(&self, dir: &str) -> Result<Vec<Listed>> {
        let p = self.path(dir);
        // The listing gives keys as stored, which is as `ObjPath` encoded them: a prefix with
        // `~`, `%`, a space or a non-ASCII letter is percent-encoded there, so it is stripped
        // in that form (stripping it as typed matched nothing, and every caller's
        // `packs/`, `layers/`, `tags/` then missed: rm deleted layers a tag named).
        let base = ObjPath::from(self.url.key("")).to_string();
        let items: Vec<_> = self.block_on(self.inner.list(Some(&p)).collect::<Vec<_>>())?;
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            let m = i.map_err(|e| self.fail(dir, "list", e))?;
            let full = m.location.to_string();
            let key = full.strip_prefix(base.as_str()).unwrap_or(&full).trim_start_matches('/').to_string();
            out.push(Listed { key, size: m.size, modified: SystemTime::from(m.last_modified) });
        }
        Ok(out)
    }
}

/// An error message on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_a_user_are_told_apart() {
        for e in ["http://u:s@h:1", "https://u@h", "u:s@h:7480/x"] {
            assert!(has_userinfo(e), "{e}");
        }
        for e in ["http://h:7480", "https://h/p@q", "http://h?a=@", "h:1"] {
            assert!(!has_userinfo(e), "{e}");
        }
    }

    #[test]
    fn endpoints_are_checked_as_the_client_parses_them() {
        for e in ["http://127.0.0.1:7480", "https://s3.example.com", "http://h:1/", "HTTP://h:7480"] {
            assert!(check_endpoint(e).is_ok(), "{e}");
        }
        for e in [
            "http:/user:SECRET@127.0.0.1:7480",
            "http:///user:SECRET@h",
            "https://u@h",
            "ftp://h",
            "http://h:7480?token=x",
            "http://h:7480#x",
            "not a url",
            "h:7480",
        ] {
            let m = check_endpoint(e).map_err(|x| x.to_string()).expect_err(e);
            assert!(!m.contains(e) && !m.contains("SECRET@") && !m.contains("token="), "{e}: {m}");
        }
    }

    #[test]
    fn shared_files_sections_are_read_by_profile() {
        let t = "[default]\naws_access_key_id = A\n[other]\naws_access_key_id=B\nregion = eu\n[profile other]\nendpoint_url = http://x\n";
        let d = ini_section(t, &["default".into()]);
        assert_eq!(d.get("aws_access_key_id").map(String::as_str), Some("A"));
        let o = ini_section(t, &["other".into(), "profile other".into()]);
        assert_eq!(o.get("aws_access_key_id").map(String::as_str), Some("B"));
        assert_eq!(o.get("endpoint_url").map(String::as_str), Some("http://x"));
    }
}

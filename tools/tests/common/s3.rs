//! The object store that tests of S3-backed layers (issue 16) run against: a real Ceph RGW.
//!
//! [`s3()`] gives the settings of the store shared by a test binary. `.ci/run` starts one cluster
//! for the whole run with `tools/ceph/start.sh` and exports its `s3.env` (S3_ENDPOINT,
//! AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, S3_BUCKET): when S3_ENDPOINT is set,
//! that is the store. Outside CI with no S3_ENDPOINT, the first test that asks starts a private
//! cluster for its test binary (in /var/tmp, on free ports) and the binary stops it when it exits.
//! One per binary, not one per test: a cluster costs ~5 s of start and ~150 MB, and with two
//! cores a dozen of them starting side by side would make every test slow; tests that share
//! one store keep apart by key prefix ([`test_prefix`]). Under CI=true a missing store fails
//! the test (see [`super::missing`]) instead of skipping it.
//!
//! [`Ceph`] is a cluster of a test's own, for tests that disturb the store (stop its gateway,
//! restart it): those must not pull the shared store from under the tests running beside them.
//!
//! A cluster started here is stopped by a watchdog process (`tools/ceph/stop.sh`, then the DIR
//! removed) when its [`Ceph`] guard is dropped, and also when the test binary dies without
//! running destructors (a panic in a static, SIGKILL, Ctrl-C): the watchdog waits for the end of
//! a pipe only this process holds. `COWDISK_KEEP_TMP=1` keeps the DIR (logs) after the stop.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use super::{is_ci, keep_tmp, missing, test_name, tool_path};

/// Where an S3 store is and how to sign for it: what `tools/ceph/start.sh` writes to `s3.env`.
#[derive(Debug, Clone)]
pub struct S3 {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub bucket: String,
}

impl S3 {
    /// The settings in the environment, or `None` if S3_ENDPOINT is not set. Panics when
    /// S3_ENDPOINT is set but another variable is missing (a half-set environment is a bug).
    pub fn from_env() -> Option<S3> {
        let endpoint = std::env::var("S3_ENDPOINT").ok().filter(|v| !v.is_empty())?;
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| panic!("S3_ENDPOINT is set ({endpoint}) but {name} is not"))
        };
        Some(S3 {
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
            region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned()),
            bucket: var("S3_BUCKET"),
            endpoint,
        })
    }

    /// Reads an `s3.env` file as `tools/ceph/start.sh` writes it.
    pub fn from_env_file(path: &Path) -> S3 {
        let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let get = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
                .unwrap_or_else(|| panic!("{} has no {name}", path.display()))
                .to_owned()
        };
        S3 {
            endpoint: get("S3_ENDPOINT"),
            access_key: get("AWS_ACCESS_KEY_ID"),
            secret_key: get("AWS_SECRET_ACCESS_KEY"),
            region: get("AWS_REGION"),
            bucket: get("S3_BUCKET"),
        }
    }

    /// The variables a child process (a `cowdisk` command) needs to reach this store, in the
    /// names the AWS tools use.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("S3_ENDPOINT", self.endpoint.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_DEFAULT_REGION", self.region.clone()),
            ("S3_BUCKET", self.bucket.clone()),
        ]
    }

    /// An `object_store` client for the bucket: path-style requests over plain HTTP, as RGW
    /// on 127.0.0.1 wants them, and a few quick retries (a test should not wait minutes).
    pub fn store(&self) -> AmazonS3 {
        self.store_with_retries(3, Duration::from_secs(10))
    }

    /// Like [`S3::store`] with at most `max_retries` retries within `timeout`: 0 to see a
    /// failure of the store at once.
    pub fn store_with_retries(&self, max_retries: usize, timeout: Duration) -> AmazonS3 {
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries,
            retry_timeout: timeout,
        };
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_virtual_hosted_style_request(false)
            .with_region(&self.region)
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_retry(retry)
            // The client options hold allow_http: set on the builder before them, it is lost.
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(30)),
            )
            .build()
            .unwrap_or_else(|e| panic!("object_store client for {self:?}: {e}"))
    }
}

/// A key prefix no other test (nor an earlier run) uses: `TEST-NAME/PID-NANOS`, for tests that
/// share a bucket.
pub fn test_prefix() -> String {
    let name: String =
        test_name().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{name}/{}-{nanos}", std::process::id())
}

/// A current-thread tokio runtime to drive the async `object_store` calls of one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

// ---------------------------------------------------------------------------
// The store of a test binary
// ---------------------------------------------------------------------------

static FROM_ENV: OnceLock<Option<S3>> = OnceLock::new();
static PRIVATE: OnceLock<Option<S3>> = OnceLock::new();
/// The private cluster behind [`PRIVATE`], taken out and dropped (stopped) at exit.
static PRIVATE_CLUSTER: Mutex<Option<Ceph>> = Mutex::new(None);

/// The S3 store for this test, or `None` when there is none and the test should skip (only
/// outside CI: under CI=true a missing store fails the test). See the module doc.
pub fn s3() -> Option<&'static S3> {
    if let Some(s3) = FROM_ENV.get_or_init(S3::from_env) {
        return Some(s3);
    }
    if is_ci() {
        missing("an S3 store (S3_ENDPOINT; .ci/run sets it from the s3.env of tools/ceph/start.sh)");
    }
    PRIVATE
        .get_or_init(|| {
            let ceph = Ceph::start()?;
            let s3 = ceph.s3().clone();
            eprintln!("started a private Ceph for this test binary in {}", ceph.dir().display());
            *PRIVATE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner()) = Some(ceph);
            // SAFETY: registers a plain extern "C" function; libtest leaves through exit(),
            // which runs it once.
            unsafe { libc::atexit(stop_private_cluster) };
            Some(s3)
        })
        .as_ref()
}

extern "C" fn stop_private_cluster() {
    let ceph = PRIVATE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(ceph);
}

// ---------------------------------------------------------------------------
// A cluster of one's own
// ---------------------------------------------------------------------------

/// A single-node Ceph cluster (mon, OSD, radosgw) started by `tools/ceph/start.sh` in a DIR of
/// its own under /var/tmp (bluestore needs a disk, not tmpfs; `COWDISK_CEPH_TMP` overrides),
/// on free ports; stopped and removed on drop, or by its watchdog if this process dies first.
pub struct Ceph {
    dir: PathBuf,
    s3: S3,
    watchdog: Option<(Child, ChildStdin)>,
}

/// One of the scripts in tools/ceph.
pub fn ceph_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ceph").join(name)
}

/// Runs `tools/ceph/SCRIPT DIR ARGS...` with no S3 or Ceph settings of ours in its environment;
/// returns its output lines, or its stdout and stderr if it failed.
fn run_script(script: &str, dir: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String, String> {
    let mut cmd = Command::new("bash");
    cmd.arg(ceph_script(script)).arg(dir).args(args).stdin(Stdio::null());
    for var in ["S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_BUCKET", "CEPH_MON_PORT", "RGW_PORT", "CEPH_CONF"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().map_err(|e| format!("cannot run {script}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "tools/ceph/{script} {} {} failed ({}): {stderr} {stdout}",
            dir.display(),
            args.join(" "),
            out.status
        ))
    }
}

impl Ceph {
    /// Starts a fresh cluster; `None` (a loud skip) if Ceph is not installed outside CI.
    /// Panics with the start script's one-line reason if it cannot start.
    pub fn start() -> Option<Ceph> {
        let tools = ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph", "curl"];
        if let Some(t) = tools.iter().find(|t| tool_path(t).is_none()) {
            missing(&format!("Ceph ({t}; apt-get install ceph-mon ceph-osd radosgw ceph-common)"));
            return None;
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("COWDISK_CEPH_TMP").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
        let mut last_err = String::new();
        // Free ports are picked here and taken by the daemons a moment later: retry if another
        // process took one in between.
        for _ in 0..3 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("cowdisk-ceph-{}-{n}", std::process::id()));
            if dir.exists() {
                let _ = fs::remove_dir_all(&dir);
            }
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            let watchdog = spawn_watchdog(&dir);
            let (mon_port, rgw_port) = (super::free_port(), super::free_port());
            let env = [("CEPH_MON_PORT", mon_port.to_string()), ("RGW_PORT", rgw_port.to_string())];
            let mut ceph = Ceph { s3: placeholder(), dir, watchdog: Some(watchdog) };
            match run_script("start.sh", &ceph.dir, &[], &env) {
                Ok(_) => {
                    ceph.s3 = S3::from_env_file(&ceph.dir.join("s3.env"));
                    return Some(ceph);
                }
                Err(e) if e.contains("is in use") => last_err = e,
                Err(e) => {
                    let logs = ceph.keep_on_drop();
                    panic!("{e}\n(cluster logs kept in {})", logs.display())
                }
            }
        }
        panic!("{last_err}")
    }

    /// Where to reach its S3 gateway.
    pub fn s3(&self) -> &S3 {
        &self.s3
    }

    /// The cluster's DIR (ceph.conf, s3.env, log/).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `tools/ceph/rgw.sh DIR stop`: the gateway goes away, the mon and OSD stay.
    pub fn rgw_stop(&self) -> String {
        run_script("rgw.sh", &self.dir, &["stop"], &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `tools/ceph/rgw.sh DIR start`: returns once a signed S3 request succeeds again.
    pub fn rgw_start(&self) -> String {
        run_script("rgw.sh", &self.dir, &["start"], &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `tools/ceph/stop.sh DIR`: the whole cluster stops; DIR stays for [`Ceph::restart`].
    pub fn stop(&self) -> String {
        run_script("stop.sh", &self.dir, &[], &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `tools/ceph/start.sh DIR` on the stopped cluster.
    pub fn restart(&self) -> String {
        self.start_script().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `tools/ceph/start.sh DIR` as it is, for tests of its refusals.
    pub fn start_script(&self) -> Result<String, String> {
        run_script("start.sh", &self.dir, &[], &[])
    }

    /// Makes the watchdog keep DIR after stopping the cluster; returns DIR.
    fn keep_on_drop(&mut self) -> PathBuf {
        let _ = fs::write(self.dir.join(".keep"), "");
        self.dir.clone()
    }
}

fn placeholder() -> S3 {
    S3 {
        endpoint: String::new(),
        access_key: String::new(),
        secret_key: String::new(),
        region: String::new(),
        bucket: String::new(),
    }
}

/// A process, in a process group of its own (Ctrl-C on the terminal does not reach it), that
/// waits for EOF on its stdin, whose write end only this process holds (the pipe is
/// close-on-exec), then runs stop.sh on DIR and removes DIR (unless COWDISK_KEEP_TMP is set or
/// DIR/.keep exists). Its output goes to DIR.stop.log, removed when all went well.
fn spawn_watchdog(dir: &Path) -> (Child, ChildStdin) {
    let log_path = PathBuf::from(format!("{}.stop.log", dir.display()));
    let log = File::create(&log_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let script = r#"
        cat >/dev/null
        if bash "$0" "$1"; then
            if [ -z "$KEEP" ] && [ ! -e "$1/.keep" ]; then rm -rf "$1"; fi
            rm -f "$1.stop.log"
        else
            exit 1
        fi"#;
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(ceph_script("stop.sh"))
        .arg(dir)
        .env("KEEP", if keep_tmp() { "1" } else { "" })
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("dup log fd"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the Ceph watchdog: {e}"));
    let stdin = child.stdin.take().expect("watchdog stdin");
    (child, stdin)
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let Some((mut child, stdin)) = self.watchdog.take() else { return };
        drop(stdin);
        match child.wait() {
            Ok(status) if status.success() => {}
            other => {
                let mut log = String::new();
                let log_path = PathBuf::from(format!("{}.stop.log", self.dir.display()));
                let _ = File::open(&log_path).and_then(|mut f| f.read_to_string(&mut log));
                eprintln!("WARNING: stopping the Ceph cluster in {} failed ({other:?}): {log}", self.dir.display());
            }
        }
    }
}

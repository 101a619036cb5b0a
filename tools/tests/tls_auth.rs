//! Client authentication against the binary: `cowdisk serve --tls-cert --tls-key --tls-ca --tls-verify-peer` with a CA, server and client certificates made by the openssl CLI; libnbd (nbdinfo, nbdcopy) and qemu-img over `nbds://` on a Unix socket and TCP with a client certificate from the CA get in, clients with none or with one from another CA are refused in the TLS handshake and learn no export name, description or size; the RSA-2432 PKCS#1 keys other NBD servers load serve here too; `--tls-psk` and half-configured client authentication are refused with one line.

mod common;

use common::tls::*;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const SIZE: u64 = 16 * MIB;
/// What a refused client must not learn: the export's name, description and size.
const EXPORT: &str = "payroll-7f3a";
const DESCRIPTION: &str = "quarterly figures";
const SIZE_TEXT: &str = "16777216";

/// A CA the server trusts for clients (`main`, which also signed the server's certificate),
/// another CA it does not (`other`), and three client certificate directories: `good`
/// (signed by main), `no_cert` (only the CA to check the server with) and `foreign` (signed
/// by other). Every directory trusts main for the server.
struct AuthRig {
    main: Pki,
    cert: PathBuf,
    key: PathBuf,
    good: PathBuf,
    no_cert: PathBuf,
    foreign: PathBuf,
    image: PathBuf,
    sock: PathBuf,
    port: u16,
    dir: TempDir,
}

impl AuthRig {
    /// Server and client keys of kind `alg`.
    fn new(alg: KeyAlg) -> AuthRig {
        let dir = TempDir::for_test();
        let main = make_pki(dir.path(), "main");
        let other = make_pki(dir.path(), "other");
        let (cert, key) = main.server_cert("server-auth", alg);
        let good = main.client_dir("good", &main.ca, alg);
        let foreign = other.client_dir("foreign", &main.ca, alg);
        // qemu refuses to send a certificate its own ca-cert.pem does not vouch for, so the
        // foreign client trusts both CAs: then it is the server that must say no.
        let bundle = [fs::read_to_string(&main.ca).unwrap(), fs::read_to_string(&other.ca).unwrap()].concat();
        fs::write(foreign.join("ca-cert.pem"), bundle).unwrap();
        let no_cert = main.client.clone();
        let image = dir.join("disk.cow");
        run(Command::new(cowdisk_bin()).args(["create", s(&image), "--size", &SIZE.to_string()]));
        let sock = dir.join("nbd.sock");
        AuthRig { main, cert, key, good, no_cert, foreign, image, sock, port: free_port(), dir }
    }

    /// `cowdisk serve` on the socket and TCP, clients checked against main's CA.
    fn serve(&self) -> Server {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut args = vec![s(&self.image), "--name", EXPORT, "--description", DESCRIPTION];
        args.extend(["--socket", s(&self.sock), "--listen", &listen]);
        args.extend(["--tls-cert", s(&self.cert), "--tls-key", s(&self.key)]);
        args.extend(["--tls-ca", s(&self.main.ca), "--tls-verify-peer"]);
        Server::start(&args)
    }

    /// NBD URIs for export `export` ("" for a listing) on the socket and on TCP, with the
    /// client certificate directory `certs`.
    fn uris(&self, export: &str, certs: &Path) -> [String; 2] {
        [tls_unix_uri(&self.sock, export, certs), tls_tcp_uri(self.port, export, certs)]
    }

    /// `qemu-img ARGS... --object tls-creds-x509 (certs) --image-opts IMAGE` where IMAGE is
    /// the export over the socket and over TCP.
    fn qemu_img(&self, args: &[&str], certs: &Path, extra: &[&str]) -> Vec<Output> {
        let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(certs));
        // qemu needs a name to check the server's certificate against on a Unix socket.
        let over_unix =
            format!("driver=nbd,path={},export={EXPORT},tls-creds=tls0,tls-hostname=localhost", s(&self.sock));
        let over_tcp = format!("driver=nbd,host=127.0.0.1,port={},export={EXPORT},tls-creds=tls0", self.port);
        [over_unix, over_tcp]
            .iter()
            .map(|image| {
                run_status(bounded("qemu-img").args(args).args(["--object", &creds, "--image-opts", image]).args(extra))
            })
            .collect()
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The client failed and nothing it printed names the export, its description or its size.
#[track_caller]
fn refused_and_told_nothing(what: &str, out: &Output) {
    let t = text(out);
    assert!(!out.status.success(), "{what}: connected:\n{t}");
    for secret in [EXPORT, DESCRIPTION, SIZE_TEXT, "16 MiB"] {
        assert!(!t.contains(secret), "{what}: learned {secret:?}:\n{t}");
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn clients_with_a_certificate_from_the_ca_read_and_write_over_unix_and_tcp() {
    if !require_tools(&["openssl", "nbdinfo", "nbdcopy", "qemu-img"]) {
        return;
    }
    let rig = AuthRig::new(KeyAlg::Ec);
    let server = rig.serve();
    assert!(server.log().contains("certificate signed by the --tls-ca CA"), "serve printed:\n{}", server.log());

    let [unix, tcp] = rig.uris(EXPORT, &rig.good);
    let out = run(bounded("nbdinfo").arg(&unix));
    let t = stdout_of(&out);
    assert!(t.contains("with TLS") && t.contains(&format!("export-size: {SIZE}")), "nbdinfo over the socket:\n{t}");
    let [list_unix, _] = rig.uris("", &rig.good);
    let t = stdout_of(&run(bounded("nbdinfo").args(["--list", &list_unix])));
    assert!(t.contains(EXPORT) && t.contains(DESCRIPTION), "nbdinfo --list with a good certificate:\n{t}");

    let input = rig.dir.join("in.raw");
    write_random_file(&input, SIZE, 0xa17);
    let expected = fs::read(&input).unwrap();
    run(bounded("nbdcopy").arg(&input).arg(&unix));
    let out = rig.dir.join("out.raw");
    run(bounded("nbdcopy").arg(&tcp).arg(&out));
    assert_bytes_eq(&fs::read(&out).unwrap(), &expected, "written over the socket, read back over TCP");

    let file = format!("driver=file,filename={}", s(&input));
    for out in rig.qemu_img(&["compare"], &rig.good, &[&file]) {
        assert!(out.status.success() && stdout_of(&out).contains("identical"), "qemu-img compare:\n{}", text(&out));
    }

    // The raw client with the same certificate, both TLS versions.
    for versions in [TLS13, TLS12] {
        let cfg = client_config_with_cert(&rig.main.ca, versions, Some(&rig.good));
        let (mut c, _) = start_tls(server.connect(), cfg);
        let list = c.opt_list().expect("NBD_OPT_LIST over TLS with a client certificate");
        assert_eq!(list.len(), 1);
        c.opt_go(EXPORT, &[]).unwrap();
        assert_eq!(c.read(0, 4096).unwrap(), expected[..4096]);
        c.disconnect().unwrap();
    }
}

#[test]
fn clients_without_a_certificate_or_with_one_from_another_ca_are_refused_and_learn_nothing() {
    if !require_tools(&["openssl", "nbdinfo", "qemu-img"]) {
        return;
    }
    let rig = AuthRig::new(KeyAlg::Ec);
    let mut server = rig.serve();

    for (who, certs) in [("no certificate", &rig.no_cert), ("a certificate from another CA", &rig.foreign)] {
        // Listing asks for no export by name: whatever names one was told by the server.
        for uri in rig.uris("", certs) {
            refused_and_told_nothing(&format!("nbdinfo --list with {who} ({uri})"), &nbdinfo(&["--list", &uri]));
        }
        for uri in rig.uris(EXPORT, certs) {
            let out = nbdinfo(&["--size", &uri]);
            assert!(!out.status.success() && out.stdout.is_empty(), "nbdinfo --size with {who}:\n{}", text(&out));
        }
        for out in rig.qemu_img(&["info"], certs, &[]) {
            assert!(!out.status.success(), "qemu-img info with {who} opened the export:\n{}", text(&out));
            assert!(!text(&out).contains("virtual size"), "qemu-img info with {who}:\n{}", text(&out));
            // Refused by the server (qemu reports the TLS handshake, or under TLS 1.3 the first
            // option after it, failing), not by qemu's own certificate checks before connecting.
            let t = text(&out);
            assert!(
                t.contains("TLS") || t.contains("option"),
                "qemu-img info with {who} failed before connecting:\n{t}"
            );
        }
    }

    // Plain text gets no further: TLS is required.
    let plain = format!("nbd+unix:///?socket={}", esc(s(&rig.sock)));
    refused_and_told_nothing("plain-text nbdinfo --list", &nbdinfo(&["--list", &plain]));

    // The raw client shows where the refusal happens. TLS 1.3: the client's side of the
    // handshake completes before the server has seen its (missing) certificate, and its first
    // option gets no reply, only the end of the connection.
    let no_cert13 = client_config(&rig.main.ca, TLS13);
    let foreign13 = client_config_with_cert(&rig.main.ca, TLS13, Some(&rig.foreign));
    for (who, cfg) in [("no certificate", no_cert13), ("a foreign certificate", foreign13)] {
        if let Ok((mut c, _)) = try_start_tls(server.connect(), cfg) {
            let r = c.opt_list();
            assert!(r.is_err(), "TLS 1.3 with {who}: NBD_OPT_LIST answered: {r:?}");
            assert!(closes_within(&mut c, Duration::from_secs(5)), "TLS 1.3 with {who}: connection left open");
        }
    }
    // TLS 1.2: the handshake itself fails.
    let r = try_start_tls(server.connect(), client_config(&rig.main.ca, TLS12));
    assert!(r.is_err(), "TLS 1.2 without a certificate completed the handshake");
    let r = try_start_tls(server.connect(), client_config_with_cert(&rig.main.ca, TLS12, Some(&rig.foreign)));
    assert!(r.is_err(), "TLS 1.2 with a foreign certificate completed the handshake");

    // The server carries on for the client that belongs.
    assert!(server.is_running(), "server exited after refusing clients:\n{}", server.log());
    let [unix, tcp] = rig.uris(EXPORT, &rig.good);
    for uri in [unix, tcp] {
        let size = stdout_of(&run(bounded("nbdinfo").args(["--size", &uri])));
        assert_eq!(size.trim(), SIZE_TEXT, "nbdinfo --size {uri} after the refusals");
    }
}

#[test]
fn an_rsa_2432_pkcs1_key_as_other_nbd_servers_load_serves_nbdinfo_and_qemu_img() {
    if !require_tools(&["openssl", "nbdinfo", "nbdcopy", "qemu-img"]) {
        return;
    }
    // The server's and the client's keys: RSA-2432 in PKCS#1, like the reference nbd
    // implementation's test key (ring, rustls's other backend, refuses such keys).
    let rig = AuthRig::new(KeyAlg::Rsa(2432));
    let pem = fs::read_to_string(&rig.key).unwrap();
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "not PKCS#1:\n{pem}");
    let details = stdout_of(&run(tool("openssl").args(["rsa", "-in", s(&rig.key), "-noout", "-text"])));
    assert!(details.contains("2432 bit"), "{}", details.lines().next().unwrap_or_default());
    let _server = rig.serve();

    let [unix, tcp] = rig.uris(EXPORT, &rig.good);
    let t = stdout_of(&run(bounded("nbdinfo").arg(&unix)));
    assert!(t.contains("with TLS") && t.contains(&format!("export-size: {SIZE}")), "nbdinfo over the socket:\n{t}");
    let size = stdout_of(&run(bounded("nbdinfo").args(["--size", &tcp])));
    assert_eq!(size.trim(), SIZE_TEXT, "nbdinfo --size over TCP");

    let input = rig.dir.join("in.raw");
    write_random_file(&input, SIZE, 0x2432);
    run(bounded("nbdcopy").arg(&input).arg(&tcp));
    let file = format!("driver=file,filename={}", s(&input));
    for out in rig.qemu_img(&["compare"], &rig.good, &[&file]) {
        assert!(out.status.success() && stdout_of(&out).contains("identical"), "qemu-img compare:\n{}", text(&out));
    }
}

/// `cowdisk serve IMAGE --socket SOCK ARGS...` fails at once with one line on stderr
/// containing every string in `says`, and does not start listening.
#[track_caller]
fn refused(rig: &AuthRig, args: &[&str], says: &[&str]) {
    let mut a = vec!["serve", s(&rig.image), "--socket", s(&rig.sock)];
    a.extend(args);
    let out = run_status(Command::new(cowdisk_bin()).args(&a));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve {args:?} succeeded");
    assert_eq!(err.trim().lines().count(), 1, "serve {args:?}: not one line:\n{err}");
    for w in says {
        assert!(err.contains(w), "serve {args:?}: error does not say {w:?}:\n{err}");
    }
    assert!(!rig.sock.exists(), "serve {args:?} created its socket before failing");
}

#[test]
fn tls_psk_and_half_configured_client_authentication_are_refused_in_one_line() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let rig = AuthRig::new(KeyAlg::Ec);
    let (cert, key, ca) = (s(&rig.cert), s(&rig.key), s(&rig.main.ca));

    // psktool's format, as nbdkit --tls-psk and libnbd's tls-psk-file read it.
    let psk = rig.dir.join("keys.psk");
    fs::write(&psk, format!("alice:{}\n", "5a".repeat(32))).unwrap();
    let says = ["--tls-psk", "not supported", "--tls-verify-peer"];
    refused(&rig, &["--tls-psk", s(&psk)], &says);
    refused(&rig, &["--tls-psk", s(&psk), "--tls", "require"], &says);
    refused(&rig, &["--tls-cert", cert, "--tls-key", key, "--tls-psk", s(&psk)], &says);

    let verify = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca, "--tls-verify-peer"];
    // Plain-text clients would walk past the certificate check.
    refused(&rig, &[&verify[..], &["--tls", "optional"]].concat(), &["--tls optional", "--tls-verify-peer"]);
    refused(&rig, &[&verify[..], &["--tls", "off"]].concat(), &["--tls off"]);
    refused(&rig, &["--tls-ca", ca, "--tls-verify-peer"], &["--tls-cert"]);
    // A CA that checks nothing, or a check without a CA.
    refused(&rig, &["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca], &["--tls-verify-peer"]);
    refused(&rig, &["--tls-cert", cert, "--tls-key", key, "--tls-verify-peer"], &["--tls-ca"]);
    // CA files that are not CA certificates, named in the error.
    let missing = rig.dir.join("no-such-ca.pem");
    let junk = rig.dir.join("junk-ca.pem");
    fs::write(&junk, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    for bad in [s(&missing), key, s(&junk)] {
        refused(&rig, &["--tls-cert", cert, "--tls-key", key, "--tls-ca", bad, "--tls-verify-peer"], &[bad]);
    }
}

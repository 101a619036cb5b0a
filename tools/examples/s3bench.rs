//! The peers of the object-store benchmark (tools/bench/remote.sh), with the same S3 client
//! library cowdisk uses (object_store): a whole file uploaded as one multipart object, a whole
//! object downloaded to a file, and a presigned GET URL for nbdkit's curl plugin.
//!
//! `s3bench upload FILE KEY [public]`, `s3bench download KEY FILE`, `s3bench presign KEY SECONDS`,
//! `s3bench du PREFIX` (bytes stored under PREFIX), `s3bench rm PREFIX` (delete it all), with
//! the store from S3_ENDPOINT (or AWS_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
//! AWS_REGION and S3_BUCKET. upload and download print the seconds they took.

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::signer::{Method, Signer};
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, WriteMultipart};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn var(k: &str) -> Result<String, String> {
    std::env::var(k).map_err(|_| format!("{k} is not set"))
}

/// `public`: every request carries `x-amz-acl: public-read`, so that an uploaded object can be
/// read by plain URL (nbdkit's curl plugin sends a HEAD before its GETs: one presigned URL
/// cannot serve both).
fn store(public: bool) -> Result<AmazonS3, String> {
    let endpoint = var("S3_ENDPOINT").or_else(|_| var("AWS_ENDPOINT_URL"))?;
    let mut headers = http::HeaderMap::new();
    if public {
        headers.insert("x-amz-acl", http::HeaderValue::from_static("public-read"));
    }
    AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_virtual_hosted_style_request(false)
        .with_region(var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()))
        .with_bucket_name(var("S3_BUCKET")?)
        .with_access_key_id(var("AWS_ACCESS_KEY_ID")?)
        .with_secret_access_key(var("AWS_SECRET_ACCESS_KEY")?)
        .with_client_options(
            ClientOptions::new().with_allow_http(endpoint.starts_with("http://")).with_default_headers(headers),
        )
        .build()
        .map_err(|e| e.to_string())
}

async fn upload(s: &AmazonS3, file: &str, key: &str) -> Result<(), String> {
    let mut f = std::fs::File::open(file).map_err(|e| format!("{file}: {e}"))?;
    let t = Instant::now();
    let up = s.put_multipart(&ObjPath::from(key)).await.map_err(|e| e.to_string())?;
    // 16 MiB parts, 4 in flight: what cowdisk's push uses for its packs.
    let mut w = WriteMultipart::new_with_chunk_size(up, 16 << 20);
    let mut buf = vec![0u8; 16 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        w.wait_for_capacity(4).await.map_err(|e| e.to_string())?;
        w.write(&buf[..n]);
    }
    w.finish().await.map_err(|e| e.to_string())?;
    println!("{:.3}", t.elapsed().as_secs_f64());
    Ok(())
}

async fn download(s: &AmazonS3, key: &str, file: &str) -> Result<(), String> {
    let t = Instant::now();
    let mut out = std::fs::File::create(file).map_err(|e| format!("{file}: {e}"))?;
    let mut stream = s.get(&ObjPath::from(key)).await.map_err(|e| e.to_string())?.into_stream();
    while let Some(b) = stream.next().await {
        out.write_all(&b.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    out.sync_all().map_err(|e| e.to_string())?;
    println!("{:.3}", t.elapsed().as_secs_f64());
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("s3bench: {e}");
            std::process::exit(1)
        }
    };
    let r = rt.block_on(async {
        let public = args.last().is_some_and(|a| a == "public");
        let s = store(public)?;
        match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["upload", file, key] | ["upload", file, key, "public"] => upload(&s, file, key).await,
            ["download", key, file] => download(&s, key, file).await,
            ["presign", key, secs] => {
                let secs: u64 = secs.parse().map_err(|_| format!("{secs}: not a number of seconds"))?;
                let url = s
                    .signed_url(Method::GET, &ObjPath::from(key), Duration::from_secs(secs))
                    .await
                    .map_err(|e| e.to_string())?;
                println!("{url}");
                Ok(())
            }
            ["rm", prefix] => {
                let keys: Vec<ObjPath> = s
                    .list(Some(&ObjPath::from(prefix)))
                    .map(|m| m.map(|m| m.location))
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                for k in &keys {
                    s.delete(k).await.map_err(|e| e.to_string())?;
                }
                println!("{}", keys.len());
                Ok(())
            }
            ["du", prefix] => {
                let mut total = 0u64;
                let mut list = s.list(Some(&ObjPath::from(prefix)));
                while let Some(m) = list.next().await {
                    total += m.map_err(|e| e.to_string())?.size;
                }
                println!("{total}");
                Ok(())
            }
            _ => Err("usage: s3bench upload FILE KEY [public] | du PREFIX | rm PREFIX | download KEY FILE | presign KEY SECONDS"
                .to_string()),
        }
    });
    if let Err(e) = r {
        eprintln!("s3bench: {e}");
        std::process::exit(1);
    }
}

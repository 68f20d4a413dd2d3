//! S3 through `aws-sdk-s3`: custom endpoints and path-style addressing for S3-compatible
//! stores, CRC32 checksums on every upload unless turned off (the server rejects a corrupted body),
//! multipart uploads for large files (aborted on failure, so no orphan parts are billed),
//! and the SDK's retries with backoff.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
    ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls;

use super::{ObjectInfo, StorageError};

const BACKEND: &str = "s3";
/// Files above this are uploaded in parts of this size (S3's minimum part is 5 MiB).
const PART_SIZE: u64 = 16 * 1024 * 1024;

/// Where and how to reach the bucket. Empty credentials mean the standard AWS chain
/// (environment, profile, instance role).
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub path_style: bool,
    /// CRC32 checksums on uploads (the server checks the body). Off for S3-compatible
    /// stores that refuse the checksum headers (GCS' S3 API, some appliances).
    pub checksums: bool,
    /// Server-side encryption of every object written (`AES256`, `aws:kms`,
    /// `aws:kms:dsse`); empty: the bucket's default.
    pub server_side_encryption: String,
    /// The KMS key for `aws:kms*`; empty: the AWS-managed key.
    pub sse_kms_key_id: String,
    /// The storage class of every object written; empty: the bucket's default.
    pub storage_class: String,
    /// The account that must own the bucket, checked by S3 on every request; empty: none.
    pub expected_bucket_owner: String,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    checksum: Option<ChecksumAlgorithm>,
    /// What every object written asks for (encryption, KMS key, storage class).
    sse: Option<ServerSideEncryption>,
    kms_key: Option<String>,
    storage_class: Option<StorageClass>,
    /// `x-amz-expected-bucket-owner`, on every request.
    owner: Option<String>,
}

/// A multipart upload not yet completed: aborted when dropped open.
struct PendingUpload {
    client: Client,
    bucket: String,
    owner: Option<String>,
    key: String,
    upload_id: String,
    open: bool,
}

impl PendingUpload {
    async fn abort(&mut self) {
        self.open = false;
        let _ = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .key(&self.key)
            .upload_id(&self.upload_id)
            .send()
            .await;
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut open = PendingUpload {
            client: self.client.clone(),
            bucket: std::mem::take(&mut self.bucket),
            owner: self.owner.take(),
            key: std::mem::take(&mut self.key),
            upload_id: std::mem::take(&mut self.upload_id),
            open: true,
        };
        runtime.spawn(async move { open.abort().await });
    }
}

fn describe<E: std::error::Error>(e: E) -> String {
    with_hint(DisplayErrorContext(e).to_string())
}

/// An S3 request's error as S3 words it (`InvalidAccessKeyId (HTTP 403): The AWS Access
/// Key Id you provided does not exist in our records.`), else as the SDK does, without
/// the dump of the raw response (headers, body) the SDK appends.
fn describe_sdk<E>(
    e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use aws_sdk_s3::error::ProvideErrorMetadata;
    if let (aws_sdk_s3::error::SdkError::ServiceError(service), Some(code)) = (&e, e.code()) {
        let status = service.raw().status().as_u16();
        let said = match e.message() {
            Some(m) if !m.is_empty() => format!("{code} (HTTP {status}): {m}"),
            _ => format!("{code} (HTTP {status})"),
        };
        return with_hint(said);
    }
    describe(e)
}

/// The SDK's error text up to the `Debug` dump of its variant (`(DispatchFailure(...`,
/// `(ServiceError(...`), which holds the raw response, several kilobytes of it.
fn without_debug_dump(text: String) -> String {
    let dumps = [
        " (DispatchFailure(",
        " (ServiceError(",
        " (ResponseError(",
        " (TimeoutError(",
        " (ConstructionFailure(",
    ];
    match dumps.iter().filter_map(|d| text.find(d)).min() {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// An error that says what to change where S3's own words do not: the SDK does not follow
/// S3's redirect to a bucket's region, and a `301 PermanentRedirect` names no setting.
/// Read on the SDK's whole text (its dump names `CredentialsNotLoaded`), said without the
/// dump.
fn with_hint(text: String) -> String {
    // No credentials anywhere: the chain's own account (each provider it tried) is kept,
    // the SDK's debug dump of the same after it is not.
    if text.contains("no credentials found in chain") || text.contains("CredentialsNotLoaded") {
        let chain = without_debug_dump(text);
        return format!(
            "no S3 credentials: set `[s3] access_key` and `secret_key` (or SLUICE_S3_ACCESS_KEY and SLUICE_S3_SECRET_KEY), or give the AWS chain some (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, a web identity, an instance role). {chain}"
        );
    }
    // S3's error codes for a request sent to another region than the bucket's.
    let wrong_region = [
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IncorrectEndpoint",
    ];
    let wrong = wrong_region.iter().any(|w| text.contains(w));
    let said = without_debug_dump(text);
    if wrong {
        format!("{said} (the bucket is in another region than the client's: set `[s3] region` to the bucket's)")
    } else {
        said
    }
}

/// Percent-encodes a key for `x-amz-copy-source` (everything but unreserved and `/`).
fn encode_copy_source(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The region when none is configured and the AWS chain gives none (an S3-compatible
/// store, a machine without AWS settings).
const DEFAULT_REGION: &str = "us-east-1";

/// `key` under `prefix` (a prefix without its slashes; empty: the bucket's root).
fn under(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}/{key}")
    }
}

impl S3Store {
    pub async fn connect(settings: &S3Settings) -> Result<Self, StorageError> {
        // rustls with ring: no C toolchain needed to build, same TLS as the rest of Sluice.
        // Proxies from the environment (`HTTPS_PROXY`, `NO_PROXY`), as the SDK's own
        // client does: S3 and the AWS credential services are the operator's endpoints,
        // not addresses an API or a config names (the HTTP connectors ignore proxies).
        let http = aws_smithy_http_client::Builder::new().build_with_connector_fn(
            |settings, components| {
                let mut conn = aws_smithy_http_client::Connector::builder()
                    .tls_provider(tls::Provider::Rustls(
                        tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .proxy_config(ProxyConfig::from_env());
                conn.set_connector_settings(settings.cloned());
                if let Some(components) = components {
                    conn.set_sleep_impl(components.sleep_impl());
                }
                conn.build()
            },
        );
        // The AWS settings of the environment and profile (credentials when none are
        // configured, `AWS_ENDPOINT_URL`, FIPS and dual-stack endpoints, checksum
        // settings), with Sluice's settings over them. The region comes from the chain
        // only for AWS itself: an S3-compatible endpoint takes any region, and looking
        // one up there would wait for an instance-metadata service that is not there.
        let endpoint_from_env = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()));
        let chain_region =
            settings.region.is_empty() && settings.endpoint.is_empty() && !endpoint_from_env;
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http.clone());
        if !chain_region {
            loader = loader.region(Region::new(if settings.region.is_empty() {
                DEFAULT_REGION.to_string()
            } else {
                settings.region.clone()
            }));
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .cloned()
            .unwrap_or_else(|| Region::new(DEFAULT_REGION));
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .behavior_version(BehaviorVersion::latest())
            .region(region)
            .http_client(http.clone())
            .force_path_style(settings.path_style)
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if !settings.endpoint.is_empty() {
            // A FIPS or dual-stack setting of the environment names AWS endpoints, which
            // S3's endpoint rules refuse together with a custom one.
            builder = builder
                .endpoint_url(&settings.endpoint)
                .use_fips(false)
                .use_dual_stack(false);
        }
        if !settings.checksums {
            builder = builder
                .request_checksum_calculation(
                    aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                )
                .response_checksum_validation(
                    aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                );
        }
        if !settings.access_key.is_empty() {
            builder = builder.credentials_provider(Credentials::new(
                &settings.access_key,
                &settings.secret_key,
                None,
                None,
                "sluice-config",
            ));
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.trim_matches('/').to_string(),
            checksum: settings.checksums.then_some(ChecksumAlgorithm::Crc32),
            sse: (!settings.server_side_encryption.is_empty())
                .then(|| ServerSideEncryption::from(settings.server_side_encryption.as_str())),
            kms_key: (!settings.sse_kms_key_id.is_empty()).then(|| settings.sse_kms_key_id.clone()),
            storage_class: (!settings.storage_class.is_empty())
                .then(|| StorageClass::from(settings.storage_class.as_str())),
            owner: (!settings.expected_bucket_owner.is_empty())
                .then(|| settings.expected_bucket_owner.clone()),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn full(&self, key: &str) -> String {
        under(&self.prefix, key)
    }

    pub fn url(&self, key: &str) -> String {
        Self::url_of(&self.bucket, &self.prefix, key)
    }

    /// [`Self::url`] of `key` in a store of `bucket` and `prefix`, without connecting.
    pub fn url_of(bucket: &str, prefix: &str, key: &str) -> String {
        format!("s3://{bucket}/{}", under(prefix.trim_matches('/'), key))
    }

    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .key(self.full(key))
            .body(ByteStream::from(bytes))
            .set_checksum_algorithm(self.checksum.clone())
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key.clone())
            .set_storage_class(self.storage_class.clone())
            .send()
            .await
            .map_err(|e| StorageError::op(BACKEND, key, "put", describe_sdk(e)))?;
        Ok(())
    }

    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| StorageError::op(BACKEND, key, "stat local file", e))?
            .len();
        if size <= PART_SIZE {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| StorageError::op(BACKEND, key, "read local file", e))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .set_expected_bucket_owner(self.owner.clone())
                .key(self.full(key))
                .body(body)
                .set_checksum_algorithm(self.checksum.clone())
                .set_server_side_encryption(self.sse.clone())
                .set_ssekms_key_id(self.kms_key.clone())
                .set_storage_class(self.storage_class.clone())
                .send()
                .await
                .map_err(|e| StorageError::op(BACKEND, key, "put", describe_sdk(e)))?;
            return Ok(());
        }
        let full = self.full(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .key(&full)
            .set_checksum_algorithm(self.checksum.clone())
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key.clone())
            .set_storage_class(self.storage_class.clone())
            .send()
            .await
            .map_err(|e| {
                StorageError::op(BACKEND, key, "create multipart upload", describe_sdk(e))
            })?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        // Aborted on every way out but a completed upload (a run stopped mid-upload drops
        // this future: the guard aborts then), so no invisible parts are left billed.
        let mut pending = PendingUpload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            owner: self.owner.clone(),
            key: full.clone(),
            upload_id: upload_id.clone(),
            open: true,
        };
        let result = match self.upload_parts(key, &full, &upload_id, path, size).await {
            Ok(parts) => {
                let count = parts.len();
                let completed = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .set_expected_bucket_owner(self.owner.clone())
                    .key(&full)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await;
                match completed {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let e = describe_sdk(e);
                        if self.completed_anyway(&full, size, count).await {
                            tracing::warn!(key = %full, error = %e, "the answer to completing a multipart upload was lost, but the object is in place (its size and part count match)");
                            Ok(())
                        } else {
                            Err(StorageError::op(
                                BACKEND,
                                key,
                                "complete multipart upload",
                                e,
                            ))
                        }
                    }
                }
            }
            Err(e) => Err(e),
        };
        if result.is_ok() {
            pending.open = false;
        } else {
            pending.abort().await;
        }
        result
    }

    /// Whether a multipart upload whose completion failed is in place all the same: the
    /// completion took, and its answer was lost (a connection cut), so the SDK's retry of
    /// it found the upload gone (`NoSuchUpload`, as S3 answers an upload already
    /// completed). `full` is a key of this run's own (staging keys name the run), so an
    /// object there of `size` bytes made of `parts` parts (its ETag ends `-parts`) is this
    /// upload's.
    async fn completed_anyway(&self, full: &str, size: u64, parts: usize) -> bool {
        let Ok(Some(head)) = self.head_full(full, full).await else {
            return false;
        };
        let etag = head.e_tag().unwrap_or_default().trim_matches('"');
        head.content_length() == Some(size as i64) && etag.ends_with(&format!("-{parts}"))
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        path: &Path,
        size: u64,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < size {
            let length = PART_SIZE.min(size - offset);
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(length))
                .build()
                .await
                .map_err(|e| StorageError::op(BACKEND, key, "read local file", e))?;
            let done = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .set_expected_bucket_owner(self.owner.clone())
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .body(body)
                .set_checksum_algorithm(self.checksum.clone())
                .send()
                .await
                .map_err(|e| StorageError::op(BACKEND, key, "upload part", describe_sdk(e)))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(done.e_tag().map(str::to_string))
                    .set_checksum_crc32(done.checksum_crc32().map(str::to_string))
                    .build(),
            );
            offset += length;
            number += 1;
        }
        Ok(parts)
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| StorageError::op(BACKEND, key, "get", describe_sdk(e)))?;
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::op(BACKEND, key, "read body", describe(e)))?;
        Ok(bytes.into_bytes().to_vec())
    }

    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let source = encode_copy_source(&format!("{}/{}", self.bucket, self.full(from)));
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .set_expected_source_bucket_owner(self.owner.clone())
            .copy_source(source)
            .key(self.full(to))
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key.clone())
            .set_storage_class(self.storage_class.clone())
            .send()
            .await
            .map_err(|e| StorageError::op(BACKEND, to, "copy", describe_sdk(e)))?;
        Ok(())
    }

    pub async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let out = self.head_full(&self.full(key), key).await?;
        Ok(out.map(|o| o.content_length().unwrap_or(0).max(0) as u64))
    }

    /// The object at `full` (a key under the prefix already), if there is one; `key`
    /// names it in errors.
    async fn head_full(
        &self,
        full: &str,
        key: &str,
    ) -> Result<Option<aws_sdk_s3::operation::head_object::HeadObjectOutput>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .key(full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(StorageError::op(BACKEND, key, "head", describe_sdk(e))),
        }
    }

    pub async fn sha256(&self, key: &str) -> Result<Option<(u64, String)>, StorageError> {
        use sha2::{Digest, Sha256};
        // The SHA-256 is the check: the SDK's own response check is left off, since it
        // cannot check the checksum of a multipart upload's parts and warns on every file
        // over 16 MB.
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .key(self.full(key))
            .customize()
            .config_override(
                aws_sdk_s3::config::Builder::new().response_checksum_validation(
                    aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                ),
            )
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(StorageError::op(BACKEND, key, "get", describe_sdk(e))),
        };
        let mut body = out.body;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| StorageError::op(BACKEND, key, "read body", describe(e)))?
        {
            hasher.update(&chunk);
            total += chunk.len() as u64;
        }
        Ok(Some((total, format!("{:x}", hasher.finalize()))))
    }

    /// Lists at most one key under the root: the credentials, the bucket and the endpoint
    /// answer (see [`super::ObjectStore::check`]).
    pub async fn check(&self) -> Result<(), StorageError> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .prefix(self.full(""))
            .max_keys(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                StorageError::op(
                    BACKEND,
                    &self.url(""),
                    "check the destination",
                    describe_sdk(e),
                )
            })
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let full_prefix = self.full(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .set_expected_bucket_owner(self.owner.clone())
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| StorageError::op(BACKEND, prefix, "list", describe_sdk(e)))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push(ObjectInfo {
                        key: k.get(strip..).unwrap_or(k).to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes `keys` (a missing key is no error). Many at once with `DeleteObjects`,
    /// unless checksums are off: the SDK sends that call with a checksum header whatever
    /// the setting, which the stores needing it off refuse, as do stores without batch
    /// delete. Those (and a batch the store refuses) go one `DeleteObject` per key.
    pub async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        if keys.len() == 1 || self.checksum.is_none() {
            return self.delete_each(keys).await;
        }
        for chunk in keys.chunks(1000) {
            if let Err(batch) = self.delete_batch(chunk).await {
                tracing::debug!(error = %batch, "batch delete refused; deleting one by one");
                self.delete_each(chunk).await?;
            }
        }
        Ok(())
    }

    async fn delete_each(&self, keys: &[String]) -> Result<(), StorageError> {
        for key in keys {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .set_expected_bucket_owner(self.owner.clone())
                .key(self.full(key))
                .send()
                .await
                .map_err(|e| StorageError::op(BACKEND, key, "delete", describe_sdk(e)))?;
        }
        Ok(())
    }

    async fn delete_batch(&self, chunk: &[String]) -> Result<(), StorageError> {
        let objects = chunk
            .iter()
            .map(|k| ObjectIdentifier::builder().key(self.full(k)).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StorageError::op(BACKEND, &chunk[0], "delete", e))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| StorageError::op(BACKEND, &chunk[0], "delete", e))?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .set_expected_bucket_owner(self.owner.clone())
            .delete(delete)
            .send()
            .await
            .map_err(|e| StorageError::op(BACKEND, &chunk[0], "delete", describe_sdk(e)))?;
        if let Some(err) = out.errors().first() {
            return Err(StorageError::op(
                BACKEND,
                err.key().unwrap_or(""),
                "delete",
                err.message().unwrap_or("refused"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_is_percent_encoded() {
        assert_eq!(
            encode_copy_source("b/ex/EVENT_DATA/dt=2026-11-25/part 1.parquet"),
            "b/ex/EVENT_DATA/dt%3D2026-11-25/part%201.parquet"
        );
    }

    #[test]
    fn a_wrong_region_error_names_the_setting() {
        let hinted = with_hint("service error: PermanentRedirect: The bucket you are attempting to access must be addressed using the specified endpoint.".into());
        assert!(
            hinted.ends_with("set `[s3] region` to the bucket's)"),
            "{hinted}"
        );
        let other = "service error: NoSuchBucket".to_string();
        assert_eq!(with_hint(other.clone()), other);
    }

    #[test]
    fn the_sdks_dump_of_a_failed_request_is_left_out() {
        let text = "dispatch failure: io error: error trying to connect: tcp connect error: Connection refused (os error 111) (DispatchFailure(DispatchFailure { source: ConnectorError { kind: Io, source: hyper_util::client::legacy::Error(Connect, ...) } }))";
        assert_eq!(
            without_debug_dump(text.into()),
            "dispatch failure: io error: error trying to connect: tcp connect error: Connection refused (os error 111)"
        );
        let plain = "timeout: the request took too long".to_string();
        assert_eq!(without_debug_dump(plain.clone()), plain);
    }

    #[test]
    fn missing_credentials_are_said_first_without_the_debug_dump() {
        // As DisplayErrorContext renders the SDK's error (its tail shortened).
        let text = "dispatch failure: other: the credential provider was not enabled: no credentials found in chain. Attempted:\n  Environment: the credential provider was not enabled: environment variable not set (DispatchFailure(DispatchFailure { source: ConnectorError { kind: Other(None), source: CredentialsNotLoaded(CredentialsNotLoaded { source: None }) } }))";
        let said = with_hint(text.into());
        assert!(
            said.starts_with("no S3 credentials: set `[s3] access_key`"),
            "{said}"
        );
        assert!(said.ends_with("Environment: the credential provider was not enabled: environment variable not set"), "{said}");
    }
}

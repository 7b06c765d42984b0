//! An event stream over TLS 1.3 once its request is read, holding only what sending needs: the
//! server's traffic key and IV as rustls hands them over, and the record sequence number, over the
//! bare socket. The rule it keeps: every record it writes is a TLS 1.3 record (RFC 8446 §5.2,
//! §5.3) sealed with that key under the next sequence number, so the client cannot tell it from
//! rustls' own, and never past the suite's confidentiality limit.
//!
//! Why not rustls' connection: its buffered API keeps about 6.5 KB of heap per idle connection
//! that no call releases (a 4 KiB read buffer it regrows on every read, both directions' keys,
//! the key schedule and handshake state, see docs/ARCHITECTURE.md) plus 1.2 KB inline, more than
//! the whole plain stream, and issue 13 asks for at most 4 KiB per idle TLS stream. The
//! unbuffered API (`UnbufferedServerConnection`) would drop only the read buffer. An event stream
//! expects nothing from its client after the request, so once the lean path takes a TLS 1.3
//! connection its secrets are extracted (the handoff rustls offers for kernel TLS) and the
//! connection is dropped. Even rustls' record encrypter is not kept: ring's expanded AES-GCM key
//! is about 560 B, so the key is expanded on the stack for each write (about 0.3 µs for AES-GCM,
//! 0.06 µs for ChaCha20 in a release build, beside the write's system call) and an idle stream
//! keeps 44 bytes of key and IV. The encryption is ring's AEAD, the one rustls uses; only the
//! record framing around it is written here, because rustls can rebuild its encrypter from
//! extracted secrets for 32-byte keys only.
//!
//! What the client sends is not decrypted: an open event stream ignores it (counted as stray bytes
//! by the writer), and the end of the socket ends the stream (a client's `close_notify` arrives
//! just before it). So a client's TLS 1.3 `KeyUpdate` asking for ours is not answered; herald keeps
//! writing with the key the client reads with, which it keeps until it gets a `KeyUpdate` from us,
//! so the stream goes on. At the suite's confidentiality limit (2^24 records for AES-GCM) the
//! stream ends instead of updating its key, and the client resumes on a new connection with
//! `Last-Event-ID`. TLS 1.2 connections stay on rustls' buffered connection.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Most plaintext in one TLS record (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 16 * 1024;
/// Most plaintext sealed by one write: what a stalled client can pin here is this, sealed.
const MAX_SEAL: usize = 4 * MAX_FRAGMENT;
/// Most slices of one vectored write taken at once: the lean writer's frames, plus a chunk's size
/// line and end.
const MAX_SLICES: usize = crate::stream_conn::MAX_BATCH + 2;
/// Record content types (RFC 8446 §5.1).
const ALERT: u8 = 21;
const APPLICATION_DATA: u8 = 23;
/// `close_notify`: alert level warning (1), description close_notify (0).
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// A TLS 1.3 record's header: outer type application data, legacy version TLS 1.2, then length.
const RECORD_PREFIX: [u8; 3] = [APPLICATION_DATA, 3, 3];

/// What became of a TLS connection handed to the lean path.
pub(crate) enum Sealing {
    /// TLS 1.3: from now on records are sealed here.
    Sealed(SealedStream),
    /// Not TLS 1.3: rustls' connection stays (boxed: it is 1.2 KB).
    Kept(Box<TlsStream<TcpStream>>),
    /// The connection failed while rustls' last bytes were written.
    Failed,
}

/// Hands a TLS 1.3 connection over from rustls, once rustls has written everything it holds
/// (session tickets) within `timeout`. Needs `enable_secret_extraction` in the server's config.
pub(crate) async fn seal(mut tls: TlsStream<TcpStream>, timeout: Duration) -> Sealing {
    let connection = tls.get_ref().1;
    let Some(SupportedCipherSuite::Tls13(suite)) = connection.negotiated_cipher_suite() else {
        return Sealing::Kept(Box::new(tls));
    };
    if connection.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Sealing::Kept(Box::new(tls));
    }
    let limit = suite.common.confidentiality_limit;
    // rustls hands its secrets over only with nothing left to send.
    match tokio::time::timeout(timeout, tls.flush()).await {
        Ok(Ok(())) => {}
        _ => return Sealing::Failed,
    }
    let (tcp, connection) = tls.into_inner();
    let (seq, secrets) = match connection.dangerous_extract_secrets() {
        Ok(secrets) => secrets.tx,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over a TLS 1.3 connection from rustls");
            return Sealing::Failed;
        }
    };
    let (algorithm, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (&aead::CHACHA20_POLY1305, key, iv)
        }
        _ => {
            tracing::warn!("a TLS 1.3 suite without a known record key: connection dropped");
            return Sealing::Failed;
        }
    };
    Sealing::Sealed(SealedStream {
        tcp,
        algorithm,
        key,
        iv,
        seq,
        // One record is kept for the closing alert.
        limit: limit.saturating_sub(1),
        out: Vec::new(),
        sent: 0,
        closing: false,
    })
}

/// A TLS 1.3 connection that only sends: plaintext written to it goes out as sealed records.
/// Reading passes the client's bytes through unopened (see the module's comment).
pub(crate) struct SealedStream {
    tcp: TcpStream,
    algorithm: &'static aead::Algorithm,
    /// The server's traffic key and IV (rustls' types, which zero them when dropped).
    key: AeadKey,
    iv: Iv,
    /// The sequence number of the next record.
    seq: u64,
    /// Application records end here (the suite's confidentiality limit, less the closing alert).
    limit: u64,
    /// Sealed records the socket has not taken yet, from `sent` on; no allocation while idle.
    out: Vec<u8>,
    sent: usize,
    /// `close_notify` is sealed.
    closing: bool,
}

impl SealedStream {
    /// Writes sealed bytes until none are left or the socket is full. The buffer is kept for the
    /// next write (freed by a flush, which the writer does before it waits).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            match ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.sent += n,
            }
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Seals `close_notify` once (after what is pending) and writes it.
    fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if !self.closing {
            self.closing = true;
            let key = self.expand()?;
            self.seal(&key, ALERT, OutboundChunks::Single(&CLOSE_NOTIFY))?;
        }
        self.poll_drain(cx)
    }

    /// The expanded key, for one write's records.
    fn expand(&self) -> io::Result<LessSafeKey> {
        UnboundKey::new(self.algorithm, self.key.as_ref())
            .map(LessSafeKey::new)
            .map_err(|_| io::Error::other("the TLS traffic key does not fit its cipher"))
    }

    /// Appends one record of at most `MAX_FRAGMENT` bytes of `payload`, of inner content type
    /// `typ`, to `out`: header, payload, type, then the tag, sealed under the next sequence
    /// number, the header being the additional data (RFC 8446 §5.2).
    fn seal(&mut self, key: &LessSafeKey, typ: u8, payload: OutboundChunks<'_>) -> io::Result<()> {
        if typ == APPLICATION_DATA && self.seq >= self.limit {
            return Err(io::Error::other(
                "the TLS key's record limit is reached: the stream ends and the client resumes",
            ));
        }
        let tag_len = key.algorithm().tag_len();
        let length = u16::try_from(payload.len() + 1 + tag_len).map_err(io::Error::other)?;
        let [high, low] = length.to_be_bytes();
        let header = [
            RECORD_PREFIX[0],
            RECORD_PREFIX[1],
            RECORD_PREFIX[2],
            high,
            low,
        ];
        // The per-record nonce: the IV with the sequence number XORed into its last 8 bytes.
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce.copy_from_slice(self.iv.as_ref());
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.out.reserve(header.len() + usize::from(length));
        self.out.extend_from_slice(&header);
        let start = self.out.len();
        payload.copy_to_vec(&mut self.out);
        self.out.push(typ);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut self.out[start..],
            )
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        self.seq += 1;
        Ok(())
    }
}

impl AsyncWrite for SealedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Takes up to `MAX_SEAL` bytes once what was sealed before is written, seals them as
    /// records and starts writing them; what the socket does not take now waits for the next
    /// write or flush.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx))?;
        // Records the key may still seal; at its limit the stream says goodbye cleanly and the
        // write fails, so the stream ends and its client resumes on a new connection.
        let room = this.limit.saturating_sub(this.seq);
        if room == 0 {
            ready!(this.poll_close_notify(cx))?;
            return Poll::Ready(Err(io::Error::other(
                "the TLS key's record limit is reached: the stream ends and the client resumes",
            )));
        }
        let mut chunks: [&[u8]; MAX_SLICES] = [&[]; MAX_SLICES];
        let (mut count, mut total) = (0, 0);
        for buf in bufs.iter().filter(|b| !b.is_empty()) {
            if count == MAX_SLICES || total >= MAX_SEAL {
                break;
            }
            chunks[count] = buf;
            count += 1;
            total += buf.len();
        }
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let room = usize::try_from(room).map_or(MAX_SEAL, |r| r.saturating_mul(MAX_FRAGMENT));
        let taken = total.min(MAX_SEAL).min(room);
        let key = this.expand()?;
        let records = taken.div_ceil(MAX_FRAGMENT);
        this.out
            .reserve(taken + records * (RECORD_PREFIX.len() + 3 + key.algorithm().tag_len()));
        let (mut rest, _) = OutboundChunks::new(&chunks[..count]).split_at(taken);
        while !rest.is_empty() {
            let (record, after) = rest.split_at(MAX_FRAGMENT);
            this.seal(&key, APPLICATION_DATA, record)?;
            rest = after;
        }
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Writes what is sealed, then gives the buffer back: an idle stream holds none.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        this.out = Vec::new();
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Sends `close_notify` after what is pending, then ends the socket's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_close_notify(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl AsyncRead for SealedStream {
    /// The client's bytes, still sealed: the stream only counts them and watches for the end.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::ring::cipher_suite;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::{TlsAcceptor, TlsConnector, client};

    use super::*;

    #[derive(Debug)]
    struct One(Arc<CertifiedKey>);

    impl ResolvesServerCert for One {
        fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// The sealed stream takes the socket's place in the lean writer's task: it adds the key, the
    /// IV and the sending state, nothing of rustls' connection (about 1.2 KB inline).
    #[test]
    fn a_sealed_stream_is_a_socket_and_a_few_words() {
        let (sealed, socket) = (size_of::<SealedStream>(), size_of::<TcpStream>());
        assert!(
            sealed <= socket + 128,
            "SealedStream {sealed} B, TcpStream {socket} B"
        );
    }

    /// A TLS connection over loopback: the listener's rustls settings with a fresh self-signed
    /// `localhost` certificate, and a client offering only `suite` over `version`. The client has
    /// sent `hello\n` and the server answered `ready\n`, both through rustls.
    async fn connected(
        suite: SupportedCipherSuite,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (TlsStream<TcpStream>, client::TlsStream<TcpStream>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = CertificateDer::from(made.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.key_pair.serialize_der()));
        let signer = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .unwrap();
        let certified = Arc::new(CertifiedKey::new(vec![cert.clone()], signer));
        let server = crate::tls::server_config(Arc::new(One(certified)), &[]);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        };
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
            let mut line = [0u8; 6];
            tls.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"hello\n");
            tls.write_all(b"ready\n").await.unwrap();
            tls
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"hello\n").await.unwrap();
        (serving.await.unwrap(), tls)
    }

    /// Everything the client reads up to a clean end (an end without `close_notify` is an error
    /// for a rustls client, so this returning proves the close was clean).
    fn read_all(mut client: client::TlsStream<TcpStream>) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            client
                .read_to_end(&mut got)
                .await
                .expect("a clean TLS close");
            got
        })
    }

    /// Records sealed after the handover (several records, from split slices) are read by a real
    /// rustls client right after the ones rustls wrote itself, in every TLS 1.3 suite, and the
    /// stream ends with `close_notify`. 8 MB is more than loopback's socket buffers take while the
    /// client reads, so writes also find the socket full and finish sealed bytes later.
    #[tokio::test]
    async fn a_rustls_client_reads_sealed_records_in_every_tls13_suite() {
        let payload: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
        for suite in [
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (server, client) = connected(suite, &rustls::version::TLS13).await;
            let reading = read_all(client);
            let Sealing::Sealed(mut sealed) = seal(server, Duration::from_secs(10)).await else {
                panic!("{suite:?} was not sealed");
            };
            let (third, rest) = payload.split_at(payload.len() / 3);
            let (small, rest) = rest.split_at(7);
            let mut slices = [third, small, rest].map(IoSlice::new);
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let n = sealed.write_vectored(slices).await.unwrap();
                IoSlice::advance_slices(&mut slices, n);
            }
            sealed.shutdown().await.unwrap();
            let got = reading.await.unwrap();
            assert_eq!(&got[..6], b"ready\n", "{suite:?}");
            assert!(got[6..] == payload[..], "{suite:?}: the payload differs");
        }
    }

    #[tokio::test]
    async fn tls12_keeps_the_rustls_connection() {
        let (server, client) = connected(
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            &rustls::version::TLS12,
        )
        .await;
        let reading = read_all(client);
        let Sealing::Kept(mut server) = seal(server, Duration::from_secs(10)).await else {
            panic!("a TLS 1.2 connection was taken from rustls");
        };
        server.write_all(b"event\n").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(reading.await.unwrap(), b"ready\nevent\n");
    }

    /// At the key's record limit a write fails (the stream ends and its client resumes) after
    /// the stream sent `close_notify` itself: the lean writer drops a stream whose write failed
    /// without shutting it down. A write that crosses the limit takes only what fits.
    #[tokio::test]
    async fn the_record_limit_ends_the_stream_cleanly() {
        let (server, client) = connected(
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            &rustls::version::TLS13,
        )
        .await;
        let reading = read_all(client);
        let Sealing::Sealed(mut sealed) = seal(server, Duration::from_secs(10)).await else {
            panic!("not sealed");
        };
        assert_eq!(sealed.limit, (1 << 24) - 1, "AES-GCM's limit less one");
        sealed.write_all(b"one\n").await.unwrap();
        // Room for one more record: a write of two records' worth takes one.
        sealed.limit = sealed.seq + 1;
        let big = vec![b'x'; 2 * MAX_FRAGMENT];
        assert_eq!(sealed.write(&big).await.unwrap(), MAX_FRAGMENT);
        assert!(sealed.write_all(b"two\n").await.is_err());
        assert!(sealed.write_all(b"three\n").await.is_err(), "closed");
        // Dropped as the lean writer drops it, with no shutdown.
        drop(sealed);
        let got = reading.await.unwrap();
        assert_eq!(&got[..10], b"ready\none\n");
        assert!(got[10..] == big[..MAX_FRAGMENT], "the record that fit");
    }
}

//! TLS 1.3 records after the handshake, sealed and opened here with aws-lc-rs' AEAD, as the kernel
//! does for kTLS: rustls completes the handshake, hands over the traffic secrets, and keeps
//! only what needs the key schedule (key updates, session tickets) in its `KernelConnection`.
//!
//! Why not rustls for the records: its unbuffered API copies every decrypted record into a
//! fresh `Vec` before handing it out, and its encrypter makes one record per call. Here a
//! record is opened from the receive buffer straight to the end of the plaintext before it,
//! and pending pieces are packed into full records.
//! TLS 1.2 connections stay on rustls.
use super::io::Ring;
use crate::chunks;
use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::{Bytes, BytesMut};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};
use std::collections::VecDeque;
use std::io;

const HEADER: usize = 5;
const TAG: usize = 16;
/// The most plaintext in one record (RFC 8446 §5.1).
const MAX_PLAIN: usize = 1 << 14;
/// The most ciphertext after the header: plaintext, content type, padding and tag (§5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// Room kept between the plaintext and the ciphertext, so that a record opens from one into
/// the other without overwriting ciphertext not yet read: its plaintext is at most this long.
const GAP: usize = MAX_CIPHER;
/// Pieces of at least this many bytes are sealed from where they lie, in records of their own:
/// an extra record costs less than copying this much into a shared one.
const SEAL_FROM_SOURCE: usize = 4096;

mod content {
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}
mod handshake {
    pub const NEW_SESSION_TICKET: u8 = 4;
    pub const KEY_UPDATE: u8 = 24;
}
mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    pub const USER_CANCELED: u8 = 90;
}

/// What opening the records held did.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Every whole record is open; more input is needed for the rest.
    NeedInput,
    /// The peer sent close_notify: nothing after it is read.
    PeerClosed,
}

enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
    }
}

/// One direction's key, IV and record sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Keys> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(io::Error::other("TLS cipher without a record layer here")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("TLS traffic key of the wrong length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("TLS IV of the wrong length"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce (RFC 8446 §5.3), and the sequence number moves on.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS record sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The record layer of one TLS 1.3 connection.
pub struct Records {
    kernel: Kernel,
    tx: Keys,
    rx: Keys,
    /// Records sealed under one key before it is updated (half the suite's limit).
    tx_limit: u64,
    /// A post-handshake message split over records, until it is whole.
    handshake: Vec<u8>,
    /// Bytes of no meaning between the plaintext and the ciphertext in the receive buffer
    /// ([`GAP`] once a record was opened, 0 before and after [`Records::drop_gap`]).
    pub(super) gap: usize,
    /// Post-handshake messages handled: keys updated each way, session tickets kept.
    pub(super) counts: Counts,
    /// The peer asked for a key update: ours goes out before our next record. Several
    /// requests are answered once (RFC 8446 §4.6.3).
    update_owed: bool,
    /// Key update requests since the peer's last application data: a peer that only asks
    /// would make us derive keys for nothing, so past a bound (rustls' 32) it is an error.
    requests_in_a_row: u32,
    /// Why a fatal error ended the connection (an opening failure is counted under it): once
    /// set, nothing more is opened or sealed.
    pub(super) failure: Option<&'static str>,
    /// We sent close_notify: nothing more is sealed (the peer may still send; TLS 1.3
    /// closes each direction on its own).
    closed: bool,
}

const MAX_REQUESTS_IN_A_ROW: u32 = 32;

fn ended() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "TLS connection already closed or failed",
    )
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub tx_updates: u64,
    pub rx_updates: u64,
    pub tickets: u64,
}

/// The records of a TLS 1.3 client connection whose handshake is done.
pub fn client(conn: rustls::client::UnbufferedClientConnection) -> io::Result<Records> {
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(take_over)?;
    Records::new(secrets, Kernel::Client(kernel))
}

/// The records of a TLS 1.3 server connection whose handshake is done.
pub fn server(conn: rustls::server::UnbufferedServerConnection) -> io::Result<Records> {
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(take_over)?;
    Records::new(secrets, Kernel::Server(kernel))
}

fn take_over(e: rustls::Error) -> io::Error {
    io::Error::other(format!(
        "taking over the TLS records: {e} (the TLS config must enable secret extraction)"
    ))
}

/// The alert to send (none when the peer ended with one), and the error the connection
/// ends with.
struct Fatal {
    alert: Option<u8>,
    why: String,
}

fn fatal(alert: u8, why: impl Into<String>) -> Fatal {
    Fatal {
        alert: Some(alert),
        why: why.into(),
    }
}

impl Records {
    fn new(secrets: ExtractedSecrets, kernel: Kernel) -> io::Result<Records> {
        let limit = match kernel.suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            _ => return Err(io::Error::other("TLS records taken over on TLS 1.2")),
        };
        Ok(Records {
            tx: Keys::new(secrets.tx)?,
            rx: Keys::new(secrets.rx)?,
            kernel,
            tx_limit: limit / 2,
            handshake: Vec::new(),
            gap: 0,
            counts: Counts::default(),
            update_owed: false,
            requests_in_a_row: 0,
            failure: None,
            closed: false,
        })
    }

    /// Opens every whole record in the ciphertext, which starts [`Records::gap`] bytes past the
    /// plaintext (`buf[..*plain_len]`), appending each payload to the plaintext. What is left
    /// of the ciphertext, part of a record, is then moved to [`GAP`] bytes past the new end of
    /// the plaintext: with that much room, the next records open straight from the ciphertext
    /// into place, in one pass, where opening in place and moving the payload down took two.
    /// A key update the peer asks for is answered before our next record (`seal`); on an error
    /// the fatal alert goes to `out`.
    pub(super) fn open(
        &mut self,
        buf: &mut BytesMut,
        plain_len: &mut usize,
        out: &mut Ring,
    ) -> io::Result<Opened> {
        self.check()?;
        let mut end = *plain_len;
        let cipher_at = end + self.gap;
        let (used, opened) = match self.open_records(buf, cipher_at, &mut end) {
            Ok(r) => r,
            Err(f) => {
                if let Some(alert) = f.alert {
                    self.seal_alert(alert, out);
                }
                self.failure = Some(match f.alert {
                    None => "alert_received",
                    Some(alert::BAD_RECORD_MAC) => "bad_record_mac",
                    Some(alert::RECORD_OVERFLOW) => "record_overflow",
                    Some(_) => "protocol",
                });
                return Err(io::Error::new(io::ErrorKind::InvalidData, f.why));
            }
        };
        *plain_len = end;
        if opened == Opened::PeerClosed {
            buf.truncate(end);
            self.gap = 0;
            return Ok(opened);
        }
        let (rest, left) = (cipher_at + used, buf.len() - cipher_at - used);
        // A gap, once made, keeps itself (each record opened frees more than it adds). It is
        // made only when a read brought a whole full-size record: a connection that carries
        // pings and small messages (an idle agent's) keeps no 16 KiB of room for nothing.
        let to = if self.gap == GAP || used > MAX_PLAIN {
            end + GAP
        } else {
            end
        };
        if rest < to {
            // Only when the gap is first made: room for it.
            buf.resize(to + left, 0);
        }
        buf.copy_within(rest..rest + left, to);
        buf.truncate(to + left);
        self.gap = to - end;
        Ok(opened)
    }

    /// Forgets the gap once nothing follows it (the connection's buffers are given back).
    pub(super) fn drop_gap(&mut self, cipher: &mut BytesMut) {
        if cipher.len() == self.gap {
            *cipher = BytesMut::new();
            self.gap = 0;
        }
    }

    /// Opens the whole records in `buf[cipher_at..]`, appending application data to the
    /// plaintext that ends at `*end`: how many ciphertext bytes they took, and why it stopped.
    fn open_records(
        &mut self,
        buf: &mut [u8],
        cipher_at: usize,
        end: &mut usize,
    ) -> Result<(usize, Opened), Fatal> {
        let mut at = cipher_at;
        while buf.len() - at >= HEADER {
            let header: [u8; HEADER] =
                [buf[at], buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]];
            if header[0] != content::APPLICATION_DATA {
                return Err(fatal(
                    alert::UNEXPECTED_MESSAGE,
                    format!("TLS record of type {} after the handshake", header[0]),
                ));
            }
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len > MAX_CIPHER {
                return Err(fatal(
                    alert::RECORD_OVERFLOW,
                    format!("TLS record of {len} bytes"),
                ));
            }
            if buf.len() - at - HEADER < len {
                break;
            }
            let Some(inner_len) = len.checked_sub(TAG) else {
                return Err(fatal(
                    alert::BAD_RECORD_MAC,
                    "TLS record shorter than its tag",
                ));
            };
            let nonce = self
                .rx
                .next_nonce()
                .map_err(|e| fatal(alert::BAD_RECORD_MAC, e.to_string()))?;
            let body = at + HEADER;
            // Straight into place when that leaves the ciphertext still to be read untouched
            // (the gap), else in place, to be moved down after.
            let inner_at = if *end + inner_len <= body {
                let (plain, cipher) = buf.split_at_mut(body);
                self.rx
                    .key
                    .open_separate_gather(
                        nonce,
                        Aad::from(header),
                        &cipher[..inner_len],
                        &cipher[inner_len..len],
                        &mut plain[*end..*end + inner_len],
                    )
                    .map_err(|_| fatal(alert::BAD_RECORD_MAC, "TLS record failed to decrypt"))?;
                *end
            } else {
                self.rx
                    .key
                    .open_in_place(nonce, Aad::from(header), &mut buf[body..body + len])
                    .map_err(|_| fatal(alert::BAD_RECORD_MAC, "TLS record failed to decrypt"))?;
                body
            };
            let inner = &buf[inner_at..inner_at + inner_len];
            // The content type is the last byte that is not padding.
            let Some(typ_at) = inner.iter().rposition(|&b| b != 0) else {
                return Err(fatal(
                    alert::UNEXPECTED_MESSAGE,
                    "TLS record without a content type",
                ));
            };
            // Padding included (RFC 8446 5.4).
            if inner.len() > MAX_PLAIN + 1 {
                return Err(fatal(
                    alert::RECORD_OVERFLOW,
                    "TLS record over 16 KiB of plaintext",
                ));
            }
            let typ = inner[typ_at];
            at = body + len;
            match typ {
                content::APPLICATION_DATA => {
                    if !self.handshake.is_empty() {
                        return Err(fatal(
                            alert::UNEXPECTED_MESSAGE,
                            "TLS application data inside a handshake message",
                        ));
                    }
                    if typ_at > 0 {
                        if inner_at != *end {
                            buf.copy_within(inner_at..inner_at + typ_at, *end);
                        }
                        *end += typ_at;
                        self.requests_in_a_row = 0;
                    }
                }
                content::HANDSHAKE => {
                    if typ_at == 0 {
                        return Err(fatal(
                            alert::UNEXPECTED_MESSAGE,
                            "empty TLS handshake record",
                        ));
                    }
                    self.handshake
                        .extend_from_slice(&buf[inner_at..inner_at + typ_at]);
                    self.post_handshake()?;
                }
                content::ALERT if !self.handshake.is_empty() => {
                    return Err(fatal(
                        alert::UNEXPECTED_MESSAGE,
                        "TLS alert inside a handshake message",
                    ));
                }
                content::ALERT => match &buf[inner_at..inner_at + typ_at] {
                    [_, alert::CLOSE_NOTIFY] => return Ok((at - cipher_at, Opened::PeerClosed)),
                    [1, alert::USER_CANCELED] => {}
                    [_, d] => {
                        return Err(Fatal {
                            alert: None,
                            why: format!("the peer sent TLS alert {d}"),
                        })
                    }
                    _ => return Err(fatal(alert::DECODE_ERROR, "malformed TLS alert")),
                },
                other => {
                    return Err(fatal(
                        alert::UNEXPECTED_MESSAGE,
                        format!("TLS content type {other} after the handshake"),
                    ))
                }
            }
        }
        Ok((at - cipher_at, Opened::NeedInput))
    }

    /// Handles the whole messages gathered in `self.handshake`: session tickets (kept by
    /// rustls for resumption) and key updates.
    fn post_handshake(&mut self) -> Result<(), Fatal> {
        let mut messages = std::mem::take(&mut self.handshake);
        let result = self.handle_messages(&messages);
        if let Ok(used) = result {
            messages.drain(..used);
            self.handshake = messages;
        }
        result.map(|_| ())
    }

    /// Handles each whole message at the front of `messages`; how many bytes they took.
    fn handle_messages(&mut self, messages: &[u8]) -> Result<usize, Fatal> {
        let mut used = 0;
        while let [typ, a, b, c, rest @ ..] = &messages[used..] {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if len > MAX_PLAIN * 4 {
                return Err(fatal(
                    alert::DECODE_ERROR,
                    "TLS handshake message too large",
                ));
            }
            if rest.len() < len {
                break;
            }
            let body = &rest[..len];
            used += 4 + len;
            match (*typ, &mut self.kernel) {
                (handshake::NEW_SESSION_TICKET, Kernel::Client(k)) => {
                    k.handle_new_session_ticket(body).map_err(|e| {
                        fatal(alert::DECODE_ERROR, format!("TLS session ticket: {e}"))
                    })?;
                    self.counts.tickets += 1;
                }
                (handshake::KEY_UPDATE, kernel) => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        [_] => {
                            return Err(fatal(
                                alert::ILLEGAL_PARAMETER,
                                "TLS KeyUpdate with an unknown request_update",
                            ))
                        }
                        _ => return Err(fatal(alert::DECODE_ERROR, "malformed TLS KeyUpdate")),
                    };
                    // A key change ends the record: nothing may follow it under the old key.
                    if used != messages.len() {
                        return Err(fatal(
                            alert::UNEXPECTED_MESSAGE,
                            "TLS KeyUpdate not at the end of its record",
                        ));
                    }
                    let next = kernel.update_rx().map_err(|e| {
                        fatal(alert::UNEXPECTED_MESSAGE, format!("TLS key update: {e}"))
                    })?;
                    self.rx =
                        Keys::new(next).map_err(|e| fatal(alert::DECODE_ERROR, e.to_string()))?;
                    self.counts.rx_updates += 1;
                    if requested {
                        self.requests_in_a_row += 1;
                        if self.requests_in_a_row > MAX_REQUESTS_IN_A_ROW {
                            return Err(fatal(
                                alert::UNEXPECTED_MESSAGE,
                                "TLS KeyUpdate requests without application data",
                            ));
                        }
                        self.update_owed = true;
                    }
                }
                (t, _) => {
                    return Err(fatal(
                        alert::UNEXPECTED_MESSAGE,
                        format!("TLS handshake message {t} after the handshake"),
                    ))
                }
            }
        }
        Ok(used)
    }

    /// Sends KeyUpdate (not asking the peer for one) under the old key, then uses a new one.
    fn update_tx(&mut self, out: &mut Ring) -> io::Result<()> {
        self.seal_record(
            content::HANDSHAKE,
            &[&[handshake::KEY_UPDATE, 0, 0, 1, 0]],
            out,
        )?;
        let next = self
            .kernel
            .update_tx()
            .map_err(|e| io::Error::other(format!("TLS key update: {e}")))?;
        self.tx = Keys::new(next)?;
        self.counts.tx_updates += 1;
        Ok(())
    }

    /// Packs pending pieces into as few records as they fill, sealed into `out`, until at
    /// least `at_most` bytes are sealed or none is left; how many were. A failure (no key
    /// update possible, sequence numbers exhausted) leaves the records failed.
    pub(super) fn seal(
        &mut self,
        pending: &mut VecDeque<Bytes>,
        out: &mut Ring,
        at_most: usize,
    ) -> io::Result<usize> {
        if (self.failure.is_some() || self.closed) && !pending.is_empty() {
            return Err(ended());
        }
        let sealed = self.seal_pieces(pending, out, at_most);
        if sealed.is_err() {
            self.failure = Some("seal");
        }
        sealed
    }

    fn seal_pieces(
        &mut self,
        pending: &mut VecDeque<Bytes>,
        out: &mut Ring,
        at_most: usize,
    ) -> io::Result<usize> {
        let mut sealed = 0;
        while !pending.is_empty() && sealed < at_most {
            if self.update_owed || self.tx.seq >= self.tx_limit {
                self.update_tx(out)?;
                self.update_owed = false;
            }
            let mut pieces: [&[u8]; 16] = [&[]; 16];
            let (mut n, mut len) = (0, 0);
            for p in pending.iter() {
                // A long piece gets records of its own, sealed from where it lies; short
                // ones are copied together into one.
                let long = p.len() >= SEAL_FROM_SOURCE;
                if n == pieces.len()
                    || len == MAX_PLAIN
                    || (n > 0 && (long || pieces[0].len() >= SEAL_FROM_SOURCE))
                {
                    break;
                }
                let take = p.len().min(MAX_PLAIN - len);
                pieces[n] = &p[..take];
                n += 1;
                len += take;
            }
            self.seal_record(content::APPLICATION_DATA, &pieces[..n], out)?;
            sealed += len;
            chunks::advance(pending, len);
        }
        Ok(sealed)
    }

    /// An error once a fatal one was met: the connection is unusable.
    pub(super) fn check(&self) -> io::Result<()> {
        if self.failure.is_some() {
            return Err(ended());
        }
        Ok(())
    }

    /// Queues close_notify.
    pub(super) fn close_notify(&mut self, out: &mut Ring) {
        if self.failure.is_none() && !self.closed {
            self.seal_alert(alert::CLOSE_NOTIFY, out);
            self.closed = true;
        }
    }

    fn seal_alert(&mut self, desc: u8, out: &mut Ring) {
        let level = if desc == alert::CLOSE_NOTIFY { 1 } else { 2 };
        let _ = self.seal_record(content::ALERT, &[&[level, desc]], out);
    }

    /// One record of `typ` holding `pieces` (at most 16 KiB in all), sealed into `out`. A
    /// single piece is sealed straight from where it lies; several are copied into the
    /// record first.
    fn seal_record(&mut self, typ: u8, pieces: &[&[u8]], out: &mut Ring) -> io::Result<()> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        let cipher_len = len + 1 + TAG;
        let header = [
            content::APPLICATION_DATA,
            3,
            3,
            (cipher_len >> 8) as u8,
            cipher_len as u8,
        ];
        let nonce = self.tx.next_nonce()?;
        let room = &mut out.spare(HEADER + cipher_len)[..HEADER + cipher_len];
        room[..HEADER].copy_from_slice(&header);
        // The content type byte goes after the content, encrypted with the tag.
        let (body, type_and_tag) = room[HEADER..].split_at_mut(len);
        let key = &self.tx.key;
        let sealed = match pieces {
            [one] => key.seal_out_of_place_scatter(
                nonce,
                Aad::from(header),
                one,
                body,
                &[typ],
                type_and_tag,
            ),
            _ => {
                let mut at = 0;
                for p in pieces {
                    body[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                key.seal_in_place_scatter(nonce, Aad::from(header), body, &[typ], type_and_tag)
            }
        };
        sealed.map_err(|_| io::Error::other("TLS record failed to encrypt"))?;
        out.filled_by(HEADER + cipher_len);
        Ok(())
    }
}

#[cfg(test)]
impl Records {
    /// Updates the sending key every `records` records.
    pub(super) fn update_tx_after(&mut self, records: u64) {
        self.tx_limit = records;
    }
}

/// Our record layer against rustls' own on the other end of real TCP connections: the
/// post-handshake messages a rustls or Go peer sends (session tickets, key updates both
/// ways), our own key updates, and records that are not what they should be.
#[cfg(test)]
mod tests {
    use super::super::io::{Crypto, Io};
    use super::super::tests::tls_configs;
    use crate::metrics::ReasonLabels;
    use bytes::Bytes;
    use prometheus_client::metrics::{counter::Counter, family::Family};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A tokio-rustls client on `tcp`, its handshake done.
    async fn rustls_client(
        cfg: Arc<rustls::ClientConfig>,
        tcp: TcpStream,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// A tokio-rustls server on `tcp`, its handshake done.
    async fn rustls_server(
        cfg: Arc<rustls::ServerConfig>,
        tcp: TcpStream,
    ) -> tokio_rustls::server::TlsStream<TcpStream> {
        tokio_rustls::TlsAcceptor::from(cfg)
            .accept(tcp)
            .await
            .unwrap()
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Sends `data` through `io` and reads `want` bytes back.
    async fn round(io: &mut Io<TcpStream>, data: &[u8], want: usize) -> Vec<u8> {
        io.queue(Bytes::copy_from_slice(data));
        std::future::poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
        read_n(io, want).await
    }

    /// Reads until `want` bytes of plaintext have come.
    async fn read_n(io: &mut Io<TcpStream>, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                std::future::poll_fn(|cx| io.poll_read(cx)),
            )
            .await
            .expect("answer in time")
            .expect("read");
            assert!(n > 0, "closed after {} of {want} bytes", got.len());
            got.extend_from_slice(&io.plain.split());
        }
        got
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Records arrive cut every way across reads; the first ones open in place (no gap yet),
    /// the rest straight into place past the gap. Every byte arrives, in order, and the gap
    /// goes when the buffers are given back.
    #[tokio::test]
    async fn records_open_into_place_across_reads() {
        let (server_cfg, client_cfg) = tls_configs(0);
        let (c, s) = pair().await;
        let data = pattern(4 << 20, 7);
        let sent = data.clone();
        let server = tokio::spawn(async move {
            let mut tls = rustls_server(server_cfg, s).await;
            let sizes = [1, 7, 16_384, 16_385, 50_000, 3, 100_000, 16_383, 200_000];
            let (mut at, mut i) = (0, 0);
            while at < sent.len() {
                let n = sizes[i % sizes.len()].min(sent.len() - at);
                tls.write_all(&sent[at..at + n]).await.unwrap();
                if i % 3 == 0 {
                    tls.flush().await.unwrap();
                }
                at += n;
                i += 1;
            }
            tls.flush().await.unwrap();
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
        });
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::client::UnbufferedClientConnection::new(client_cfg, name).unwrap();
        let mut io = Io::new(c, Crypto::Client(Box::new(conn)));
        io.handshake().await.unwrap();
        let got = read_n(&mut io, data.len()).await;
        assert!(got == data, "the bytes differ");
        assert_eq!(io.records_mut().expect("ours").gap, super::GAP);
        io.trim();
        assert_eq!(io.records_mut().expect("ours").gap, 0);
        drop(io);
        server.await.unwrap();
    }

    /// Small records (pings, small messages) open in place and make no gap: an idle agent's
    /// connection keeps no record's worth of room. The first read that brings full-size
    /// records makes it, and it stays.
    #[tokio::test]
    async fn only_full_size_records_make_a_gap() {
        let (server_cfg, client_cfg) = tls_configs(0);
        let (c, s) = pair().await;
        let client = tokio::spawn(async move {
            let mut tls = rustls_client(client_cfg, c).await;
            for i in 0..50u8 {
                tls.write_all(&pattern(100, i)).await.unwrap();
                tls.flush().await.unwrap();
                let mut ack = [0u8; 1];
                tls.read_exact(&mut ack).await.unwrap();
            }
            tls.write_all(&pattern(256 << 10, 99)).await.unwrap();
            tls.flush().await.unwrap();
            let mut ack = [0u8; 1];
            tls.read_exact(&mut ack).await.unwrap();
        });
        let (mut io, _) = our_server(s, server_cfg).await;
        for i in 0..50u8 {
            assert_eq!(read_n(&mut io, 100).await, pattern(100, i));
            assert_eq!(io.records_mut().expect("ours").gap, 0, "message {i}");
            io.queue(Bytes::from_static(b"k"));
            std::future::poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
        }
        assert_eq!(read_n(&mut io, 256 << 10).await, pattern(256 << 10, 99));
        assert_eq!(io.records_mut().expect("ours").gap, super::GAP);
        io.queue(Bytes::from_static(b"k"));
        std::future::poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
        client.await.unwrap();
    }

    /// Long pieces are sealed from where they lie, in records of their own; short ones share
    /// a record. Read through a TCP hop that keeps a copy of what our end sent, the records'
    /// lengths on the wire are those, and a rustls client reads every byte in order.
    #[tokio::test]
    async fn long_pieces_get_records_of_their_own() {
        let (server_cfg, client_cfg) = tls_configs(0);
        let (c, hop_in) = pair().await;
        let (hop_out, s) = pair().await;
        let wire = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = wire.clone();
        tokio::spawn(async move {
            let (mut from_client, mut to_client) = hop_in.into_split();
            let (mut from_server, mut to_server) = hop_out.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut to_server).await });
            let mut buf = vec![0; 1 << 16];
            loop {
                let n = from_server.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                if to_client.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        // The pieces queued, and the plaintext lengths of the records they must go out in.
        let pieces = [20, 65_536, 100, 5_000, 3, 2, 16_394, 4_095, 4_096];
        let records = [
            20,
            16_384,
            16_384,
            16_384,
            16_384,
            100,
            5_000,
            5,
            16_384,
            10 + 4_095,
            4_096,
        ];
        let data = pattern(pieces.iter().sum(), 3);
        let want = data.clone();
        let client = tokio::spawn(async move {
            let mut tls = rustls_client(client_cfg, c).await;
            let mut got = vec![0; want.len()];
            tls.read_exact(&mut got).await.unwrap();
            assert!(got == want, "the bytes arrive intact and in order");
        });
        let (mut io, _) = our_server(s, server_cfg).await;
        let mut at = 0;
        for len in pieces {
            io.queue(Bytes::copy_from_slice(&data[at..at + len]));
            at += len;
        }
        std::future::poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
        client.await.unwrap();
        let wire = wire.lock().unwrap().clone();
        let mut lengths = Vec::new();
        let mut at = 0;
        while at + 5 <= wire.len() {
            let len = u16::from_be_bytes([wire[at + 3], wire[at + 4]]) as usize;
            lengths.push(len);
            at += 5 + len;
        }
        let sent: Vec<usize> = records.iter().map(|n| n + 1 + 16).collect();
        assert!(
            lengths.ends_with(&sent),
            "records on the wire {lengths:?}, want them to end with {sent:?}"
        );
    }

    /// A rustls server that sends session tickets, echoes, and updates its keys (asking us
    /// to update ours) between echoes.
    #[tokio::test]
    async fn tickets_and_key_updates_from_a_rustls_peer() {
        let (server_cfg, client_cfg) = tls_configs(2);
        let (c, s) = pair().await;
        let server = tokio::spawn(async move {
            let mut tls = rustls_server(server_cfg, s).await;
            let mut buf = vec![0; 100_000];
            for _ in 0..3 {
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(&buf).await.unwrap();
                tls.get_mut().1.refresh_traffic_keys().unwrap();
                tls.flush().await.unwrap();
            }
        });
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::client::UnbufferedClientConnection::new(client_cfg, name).unwrap();
        let mut io = Io::new(c, Crypto::Client(Box::new(conn)));
        io.handshake().await.unwrap();
        assert!(matches!(io.crypto(), Crypto::Records(_)));
        for seed in 0..3 {
            let data = pattern(100_000, seed);
            assert_eq!(round(&mut io, &data, data.len()).await, data);
        }
        server.await.unwrap();
        // The last update may still be on its way. Requests are answered before our next
        // record, and requests that arrive while we are silent share one answer (RFC 8446
        // 4.6.3), so at least the first one was answered and the server read through it.
        let counts = io.records_mut().expect("ours").counts;
        assert_eq!(counts.tickets, 2, "{counts:?}");
        assert!(counts.rx_updates >= 2, "{counts:?}");
        assert!(counts.tx_updates >= 1, "{counts:?}");
    }

    /// Our side updates its sending key every few records; a rustls client reads through.
    #[tokio::test]
    async fn our_key_updates_reach_a_rustls_peer() {
        let (server_cfg, client_cfg) = tls_configs(0);
        let (c, s) = pair().await;
        let client = tokio::spawn(async move {
            let mut tls = rustls_client(client_cfg, c).await;
            let data = pattern(300_000, 7);
            tls.write_all(&data).await.unwrap();
            let mut back = vec![0; data.len()];
            tls.read_exact(&mut back).await.unwrap();
            assert_eq!(back, data);
        });
        let (mut io, _) = our_server(s, server_cfg).await;
        let Some(records) = io.records_mut() else {
            panic!("TLS 1.3 records are ours after the handshake")
        };
        records.update_tx_after(3);
        let mut got = Vec::new();
        while got.len() < 300_000 {
            let n = std::future::poll_fn(|cx| io.poll_read(cx)).await.unwrap();
            assert!(n > 0);
            let chunk = io.plain.split().freeze();
            got.extend_from_slice(&chunk);
            // Echo in small pieces so that many records (and key updates) go out.
            for piece in chunk.chunks(5000) {
                io.queue(Bytes::copy_from_slice(piece));
                std::future::poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
            }
        }
        client.await.unwrap();
        let counts = io.records_mut().expect("ours").counts;
        assert!(counts.tx_updates >= 20, "{counts:?}");
    }

    type Errors = Family<ReasonLabels, Counter>;

    /// The connection errors counted under `reason`, and in all.
    fn counted(errors: &Errors, reason: &'static str) -> (u64, u64) {
        let all = [
            "bad_record_mac",
            "record_overflow",
            "protocol",
            "alert_received",
            "truncated",
        ]
        .map(|r| errors.get_or_create(&ReasonLabels { reason: r }).get());
        let one = errors.get_or_create(&ReasonLabels { reason }).get();
        (one, all.iter().sum())
    }

    /// Our server on `s`, its handshake done, counting its errors.
    async fn our_server(s: TcpStream, cfg: Arc<rustls::ServerConfig>) -> (Io<TcpStream>, Errors) {
        let conn = rustls::server::UnbufferedServerConnection::new(cfg).unwrap();
        let mut io = Io::new(s, Crypto::Server(Box::new(conn)));
        let errors = Errors::default();
        io.count_errors(errors.clone());
        io.handshake().await.unwrap();
        (io, errors)
    }

    /// Our server on `s`: reads `first` (then lets the peer go on) and then an error, which
    /// it returns with the connection and its error counter.
    async fn read_until_error(
        s: TcpStream,
        cfg: Arc<rustls::ServerConfig>,
        first: &[u8],
        go: tokio::sync::oneshot::Sender<()>,
        what: &str,
    ) -> (Io<TcpStream>, std::io::Error, Errors) {
        let (mut io, errors) = our_server(s, cfg).await;
        let mut got = Vec::new();
        let mut go = Some(go);
        let err = loop {
            let read = std::future::poll_fn(|cx| io.poll_read(cx));
            let read = tokio::time::timeout(Duration::from_secs(10), read).await;
            match read.unwrap_or_else(|_| panic!("{what}: accepted")) {
                Ok(0) => panic!("{what}: closed without an error"),
                Ok(_) => got.extend_from_slice(&io.plain.split()),
                Err(e) => break e,
            }
            if got == first {
                go.take().map(|g| g.send(()));
            }
        };
        assert_eq!(got, first, "{what}");
        (io, err, errors)
    }

    /// Bytes that are not a valid record end the connection with an error, never a panic.
    #[tokio::test]
    async fn a_forged_record_is_an_error() {
        for (forged, reason) in [
            // A record that fails to decrypt (zeros).
            (&[23u8, 3, 3, 0, 40][..], "bad_record_mac"),
            // Plaintext handshake after the handshake.
            (&[22, 3, 3, 0, 4, 1, 2, 3, 4][..], "protocol"),
            // Over the largest record.
            (&[23, 3, 3, 0xff, 0xff][..], "record_overflow"),
            // A plaintext alert.
            (&[21, 3, 3, 0, 2, 2, 40][..], "protocol"),
        ] {
            let (server_cfg, client_cfg) = tls_configs(0);
            let (c, s) = pair().await;
            let sent = forged.to_vec();
            let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
            let client = tokio::spawn(async move {
                let mut tls = rustls_client(client_cfg, c).await;
                tls.write_all(b"fine so far").await.unwrap();
                tls.flush().await.unwrap();
                // Forged once the good record is read, so that it comes in a read of its own.
                go.await.unwrap();
                let tcp = tls.get_mut().0;
                tcp.write_all(&sent).await.unwrap();
                tcp.write_all(&[0; 40]).await.unwrap();
                // Our side answers with an alert (or just closes): the read ends either way.
                let mut rest = Vec::new();
                let _ = tls.read_to_end(&mut rest).await;
            });
            let what = format!("{forged:?}");
            let (mut io, err, errors) =
                read_until_error(s, server_cfg, b"fine so far", go_tx, &what).await;
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::InvalidData,
                "{forged:?}: {err}"
            );
            // Failed for good: nothing more is opened or sealed.
            let _ = std::future::poll_fn(|cx| io.poll_flush(cx)).await;
            let again = std::future::poll_fn(|cx| io.poll_read(cx)).await;
            assert!(
                again.is_err(),
                "{forged:?}: read after a failure: {again:?}"
            );
            io.queue(Bytes::from_static(b"after the failure"));
            let sent = std::future::poll_fn(|cx| io.poll_flush(cx)).await;
            assert!(sent.is_err(), "{forged:?}: sealed after a failure");
            assert_eq!(counted(&errors, reason), (1, 1), "{forged:?}: counted once");
            drop(io);
            client.await.unwrap();
        }
    }

    /// Seals `inner` (content, type byte, padding) as one record under `keys`.
    fn forge(keys: &mut super::Keys, inner: &[u8]) -> Vec<u8> {
        let len = inner.len() + super::TAG;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let mut body = inner.to_vec();
        let nonce = keys.next_nonce().unwrap();
        keys.key
            .seal_in_place_append_tag(nonce, super::Aad::from(header), &mut body)
            .unwrap();
        [&header[..], &body].concat()
    }

    /// Records sealed with the client's real keys (taken out of rustls after the handshake)
    /// but whose inner plaintext breaks RFC 8446: each is refused with the alert the RFC
    /// names, which is read back and opened with the client's keys. A good record first
    /// shows that the forging itself is right.
    #[tokio::test]
    async fn records_that_break_the_rfc_inside_get_its_alert() {
        let overflow = [vec![b'x'; 16384], vec![23, 0]].concat();
        let cases: [(&str, Vec<Vec<u8>>, u8); 4] = [
            ("padding past 2^14+1", vec![overflow], 22),
            ("an empty handshake record", vec![vec![22]], 10),
            (
                "an alert inside a split handshake message",
                vec![vec![4, 0, 0, 10, 1, 2, 22], vec![1, 0, 21]],
                10,
            ),
            (
                "a KeyUpdate asking for neither",
                vec![vec![24, 0, 0, 1, 2, 22]],
                47,
            ),
        ];
        for (what, records, want) in cases {
            let (server_cfg, client_cfg) = tls_configs(0);
            let (c, s) = pair().await;
            let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
            let client = tokio::spawn(async move {
                let tls = rustls_client(client_cfg, c).await;
                let (mut tcp, conn) = tls.into_inner();
                let secrets = conn.dangerous_extract_secrets().unwrap();
                let mut tx = super::Keys::new(secrets.tx).unwrap();
                let mut rx = super::Keys::new(secrets.rx).unwrap();
                let good = forge(&mut tx, b"good\x17\0\0\0");
                tcp.write_all(&good).await.unwrap();
                // The rest once the good record is read, in a read of its own.
                go.await.unwrap();
                let mut out = Vec::new();
                for r in &records {
                    out.extend(forge(&mut tx, r));
                }
                tcp.write_all(&out).await.unwrap();
                // The answer: one record holding the alert.
                let mut back = Vec::new();
                let _ = tcp.read_to_end(&mut back).await;
                assert!(back.len() > 5, "no alert came back");
                let len = usize::from(u16::from_be_bytes([back[3], back[4]]));
                let header: [u8; 5] = back[..5].try_into().unwrap();
                let nonce = rx.next_nonce().unwrap();
                rx.key
                    .open_in_place(nonce, super::Aad::from(header), &mut back[5..5 + len])
                    .unwrap()
                    .to_vec()
            });
            let (mut io, err, errors) = read_until_error(s, server_cfg, b"good", go_tx, what).await;
            let reason = if want == 22 {
                "record_overflow"
            } else {
                "protocol"
            };
            assert_eq!(counted(&errors, reason), (1, 1), "{what}: counted once");
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{what}: {err}");
            let _ = std::future::poll_fn(|cx| io.poll_flush(cx)).await;
            drop(io);
            let alert = client.await.unwrap();
            assert_eq!(alert, [2, want, 21], "{what}: {err}");
        }
    }

    /// Without secret extraction rustls cannot hand the records over: the handshake fails,
    /// and the connection refuses to read or write after it, never falling back to plaintext.
    #[tokio::test]
    async fn a_failed_take_over_leaves_nothing_usable() {
        let (server_cfg, client_cfg) = tls_configs(0);
        let mut no_secrets = (*client_cfg).clone();
        no_secrets.enable_secret_extraction = false;
        let (c, s) = pair().await;
        let server = tokio::spawn(async move {
            let mut tls = rustls_server(server_cfg, s).await;
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            rest
        });
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::client::UnbufferedClientConnection::new(Arc::new(no_secrets), name);
        let mut io = Io::new(c, Crypto::Client(Box::new(conn.unwrap())));
        assert!(io.handshake().await.is_err());
        io.queue(Bytes::from_static(b"secret"));
        assert!(std::future::poll_fn(|cx| io.poll_flush(cx)).await.is_err());
        assert!(std::future::poll_fn(|cx| io.poll_read(cx)).await.is_err());
        drop(io);
        assert_eq!(server.await.unwrap(), b"");
    }

    /// A TCP close without close_notify may be a cut: an error, never the end of the data.
    /// With close_notify first, the same close is a clean end.
    #[tokio::test]
    async fn a_close_without_close_notify_is_an_error() {
        for notify in [false, true] {
            let (server_cfg, client_cfg) = tls_configs(0);
            let (c, s) = pair().await;
            let client = tokio::spawn(async move {
                let mut tls = rustls_client(client_cfg, c).await;
                tls.write_all(b"all of it").await.unwrap();
                if notify {
                    tls.shutdown().await.unwrap();
                } else {
                    tls.flush().await.unwrap();
                    tls.get_mut().0.shutdown().await.unwrap();
                }
                tls
            });
            let (mut io, errors) = our_server(s, server_cfg).await;
            let mut got = Vec::new();
            let end = loop {
                match std::future::poll_fn(|cx| io.poll_read(cx)).await {
                    Ok(0) => break Ok(()),
                    Ok(_) => got.extend_from_slice(&io.plain.split()),
                    Err(e) => break Err(e),
                }
            };
            assert_eq!(got, b"all of it");
            match (notify, end) {
                (true, Ok(())) => {}
                (false, Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
                (_, end) => panic!("close_notify sent: {notify}, read ended {end:?}"),
            }
            let want = if notify { (0, 0) } else { (1, 1) };
            assert_eq!(counted(&errors, "truncated"), want, "notify {notify}");
            drop(client.await.unwrap());
        }
    }
}

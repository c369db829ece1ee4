//! TLS to Redis (`rediss://`): the rustls client state one connection shares between its reading
//! and writing halves, which seal and open bytes around the plain socket calls; the handshake
//! before the halves split. Borrows of the state never cross an await.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::rc::Rc;
use std::sync::Arc;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::ClientConnection;
use rustls::pki_types::ServerName;

/// A connection's TLS state, shared by its two halves.
#[derive(Clone)]
pub(crate) struct Secure(Rc<RefCell<ClientConnection>>);

impl Secure {
    /// Runs the client handshake with `addr`'s host on `stream`.
    pub(crate) async fn handshake(
        stream: &mut TcpStream,
        config: Arc<rustls::ClientConfig>,
        addr: &str,
    ) -> std::io::Result<Secure> {
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let conn = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let secure = Secure(Rc::new(RefCell::new(conn)));
        let mut buf = Vec::with_capacity(16 * 1024);
        loop {
            let out = secure.take_records()?;
            if !out.is_empty() {
                let (result, _) = stream.write_all(out).await;
                result?;
            }
            if !secure.0.borrow().is_handshaking() {
                return Ok(secure);
            }
            let (result, b) = stream.read(buf).await;
            buf = b;
            if result? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let mut ignored = Vec::new();
            secure.open(&buf, &mut ignored)?;
            buf.clear();
        }
    }

    /// The records rustls has made and not handed out yet.
    fn take_records(&self) -> std::io::Result<Vec<u8>> {
        let mut conn = self.0.borrow_mut();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    /// `plain` encrypted into records, to write as they are.
    pub(crate) fn seal(&self, plain: &[u8]) -> std::io::Result<Vec<u8>> {
        self.0.borrow_mut().writer().write_all(plain)?;
        self.take_records()
    }

    /// What `cipher` (bytes read from the socket) decrypts to, appended to `plain`.
    pub(crate) fn open(&self, cipher: &[u8], plain: &mut Vec<u8>) -> std::io::Result<()> {
        let mut conn = self.0.borrow_mut();
        let mut rest = cipher;
        loop {
            if !rest.is_empty() {
                conn.read_tls(&mut rest)?;
            }
            conn.process_new_packets()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let mut chunk = [0u8; 8192];
            loop {
                match conn.reader().read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => plain.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

//! Listen addresses as Pingora binds them, with port 0 ("any free port") supported.
//!
//! Pingora binds its listeners itself, late, inside `run_forever`, and gives no way to read
//! back the port the kernel chose. So for a port-0 address the gateway first binds a socket of
//! its own with `SO_REUSEPORT` (never listening: the kernel hands connections only to
//! listening sockets), learns the port, and hands Pingora that concrete address with
//! `SO_REUSEPORT` set so it can bind beside the reservation. The reservation is held for the
//! life of the process, so no other program can take the port in between. Each listener is
//! logged as `listening <config key> <address>`: how tests (and people) learn the ports.

use std::net::SocketAddr;

use pingora::listeners::TcpSocketOptions;
use tokio::net::TcpSocket;

/// Sockets that keep the chosen ports of port-0 listeners; hold until the process exits.
#[derive(Default)]
pub struct Reserved(Vec<TcpSocket>);

/// One listener's address for Pingora, and the socket options it must be bound with.
pub struct Bind {
    pub addr: SocketAddr,
    pub options: Option<TcpSocketOptions>,
}

impl Reserved {
    /// The address to hand Pingora for the listener configured at `key` as `addr`. A
    /// port-0 address is refused under `-u`: an upgrade takes listeners over by address, and
    /// the new process could not know the ports the old one chose.
    pub fn bind(&mut self, key: &str, addr: SocketAddr, upgrade: bool) -> anyhow::Result<Bind> {
        if addr.port() != 0 {
            log::info!("listening {key} {addr}");
            return Ok(Bind {
                addr,
                options: None,
            });
        }
        if upgrade {
            anyhow::bail!(
                "{key}: port 0 cannot be taken over by an upgrade (-u); configure a fixed port"
            );
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .and_then(|s| {
            // SO_REUSEPORT without SO_REUSEADDR: Pingora's listener (which sets both) may
            // bind beside it; a plain bind elsewhere (SO_REUSEADDR alone) may not.
            s.set_reuseport(true)?;
            s.bind(addr)?;
            Ok(s)
        })
        .map_err(|e| anyhow::anyhow!("{key}: cannot bind {addr}: {e}"))?;
        let chosen = socket
            .local_addr()
            .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        self.0.push(socket);
        log::info!("listening {key} {chosen}");
        let mut options = TcpSocketOptions::default();
        options.so_reuseport = Some(true);
        Ok(Bind {
            addr: chosen,
            options: Some(options),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_reserves_a_port_that_a_reuseport_listener_can_take() {
        let mut reserved = Reserved::default();
        let bind = reserved
            .bind("server.listen[0]", "127.0.0.1:0".parse().unwrap(), false)
            .unwrap();
        assert_ne!(bind.addr.port(), 0);
        // A plain bind of the same port fails: the reservation keeps it.
        assert!(std::net::TcpListener::bind(bind.addr).is_err());
        // A listener with SO_REUSEPORT (as Pingora's is given) binds beside it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = TcpSocket::new_v4().unwrap();
            s.set_reuseaddr(true).unwrap();
            s.set_reuseport(true).unwrap();
            s.bind(bind.addr).unwrap();
            let listener = s.listen(16).unwrap();
            let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
            tokio::net::TcpStream::connect(bind.addr).await.unwrap();
            accept.await.unwrap().unwrap();
        });
    }

    #[test]
    fn port_zero_is_refused_under_upgrade_and_fixed_ports_pass_through() {
        let mut reserved = Reserved::default();
        let e = reserved
            .bind("server.listen[0]", "127.0.0.1:0".parse().unwrap(), true)
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("server.listen[0]: port 0"), "{e}");
        let fixed = reserved
            .bind(
                "server.admin_listen",
                "127.0.0.1:9090".parse().unwrap(),
                true,
            )
            .unwrap();
        assert_eq!(fixed.addr.port(), 9090);
        assert!(fixed.options.is_none());
    }
}

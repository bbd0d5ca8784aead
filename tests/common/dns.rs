//! A DNS server for tests: hickory-server answering for the zone `test.` on
//! a loopback UDP port, from records given as (name, value) pairs.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, MX, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

pub enum Rr {
    Mx(String, u16, String),
    A(String, Ipv4Addr),
}

/// `owner MX preference exchange`.
pub fn mx(owner: &str, preference: u16, exchange: &str) -> Rr {
    Rr::Mx(owner.into(), preference, exchange.into())
}

/// `owner A ip`.
pub fn a(owner: &str, ip: Ipv4Addr) -> Rr {
    Rr::A(owner.into(), ip)
}

fn name(s: &str) -> Name {
    Name::from_ascii(if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    })
    .unwrap()
}

/// Answers after a delay, as a busy or distant nameserver does, and leaves
/// every `drop_every`-th query unanswered (0: none), as a lossy one does.
struct Delayed {
    inner: Catalog,
    delay: std::time::Duration,
    drop_every: u64,
    seen: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl RequestHandler for Delayed {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response: R) -> ResponseInfo {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if self.drop_every > 0 && n.is_multiple_of(self.drop_every) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.delay).await;
        self.inner.handle_request::<R, T>(request, response).await
    }
}

/// Serves the records until the process ends; returns the server's address.
pub fn serve(records: Vec<Rr>) -> SocketAddr {
    serve_delayed(records, std::time::Duration::ZERO, 0)
}

/// Serves the records, each answer `delay` after its query, leaving every
/// `drop_every`-th query unanswered (0: none).
pub fn serve_delayed(records: Vec<Rr>, delay: std::time::Duration, drop_every: u64) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let origin = name("test.");
            let mut zone =
                InMemoryZoneHandler::<TokioRuntimeProvider>::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
            let soa = SOA::new(name("ns.test."), name("admin.test."), 1, 3600, 600, 86400, 60);
            zone.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1);
            for r in records {
                let rec = match r {
                    Rr::Mx(owner, pref, exchange) => {
                        Record::from_rdata(name(&owner), 300, RData::MX(MX::new(pref, name(&exchange))))
                    }
                    Rr::A(owner, ip) => Record::from_rdata(name(&owner), 300, RData::A(A(ip))),
                };
                assert!(zone.upsert_mut(rec, 1));
            }
            let mut catalog = Catalog::new();
            catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
            let mut server = Server::new(Delayed {
                inner: catalog,
                delay,
                drop_every,
                seen: Default::default(),
            });
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            tx.send(socket.local_addr().unwrap()).unwrap();
            server.register_socket(socket);
            let _ = server.block_until_done().await;
        });
    });
    rx.recv().unwrap()
}

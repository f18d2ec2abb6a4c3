//! `cis490-receiver fleet [--json]`: the fleet view fetched from the running receiver's
//! operations listener (`metrics_listen`), printed as a table or as the JSON it served.

use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use cis490_common::cli::{CliError, EXIT_CONFIG};

use super::{page, FleetDoc, HostState};

/// How long the command waits for the receiver.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where to reach a listener bound to `addr` from this machine (a wildcard means loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// `GET path` over plain HTTP/1.1; the body of a 200 answer.
fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("answered {}", head.lines().next().unwrap_or("")));
    }
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:"))
    {
        return Err("the answer is chunked, which this command does not read".into());
    }
    Ok(raw[split + 4..].to_vec())
}

/// Prints the fleet; exit 1 when a host is not ok, 2 when the receiver cannot be asked.
pub(crate) fn run(metrics_listen: SocketAddr, json: bool) -> Result<(), CliError> {
    let addr = reachable(metrics_listen);
    let unreachable = |why: String| {
        CliError::new(
            EXIT_CONFIG,
            format_args!(
                "failed to read the fleet from http://{addr}/v1/fleet (metrics_listen): {why}"
            ),
        )
    };
    let body = get(addr, "/v1/fleet").map_err(unreachable)?;
    let doc: FleetDoc = serde_json::from_slice(&body)
        .map_err(|e| unreachable(format!("the answer is not a fleet view: {e}")))?;
    let mut out = std::io::stdout();
    let printed = if json {
        out.write_all(&body)
    } else {
        // The usual conventions: NO_COLOR turns colours off, CLICOLOR_FORCE on through a pipe.
        let colour = std::env::var_os("NO_COLOR").is_none()
            && (out.is_terminal() || std::env::var_os("CLICOLOR_FORCE").is_some());
        out.write_all(page::text(&doc.hosts, &doc.generated_at, colour).as_bytes())
    };
    printed.map_err(|e| CliError::failure(format_args!("failed to print: {e}")))?;
    if doc.hosts.iter().any(|h| h.state != HostState::Ok) {
        return Err(CliError::reported(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_asked_on_loopback() {
        let a: SocketAddr = "0.0.0.0:9490".parse().unwrap();
        assert_eq!(reachable(a), "127.0.0.1:9490".parse().unwrap());
        let b: SocketAddr = "[::]:9490".parse().unwrap();
        assert_eq!(reachable(b), "[::1]:9490".parse().unwrap());
        let c: SocketAddr = "10.0.0.5:9490".parse().unwrap();
        assert_eq!(reachable(c), c);
    }
}

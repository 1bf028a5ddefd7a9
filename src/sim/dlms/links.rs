//! The two links, sans-IO: the wrapper, and HDLC with several meters on one line.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------
// The links, sans-IO
// ---------------------------------------------------------------------------------------------

/// The IEC 62056-47 wrapper side of one TCP connection to a meter.
#[derive(Debug)]
pub struct WrapperServer {
    meter: Meter,
    splitter: wrapper::Splitter,
    session: Option<Session>,
}

impl WrapperServer {
    pub fn new(meter: Meter) -> Self {
        WrapperServer {
            meter,
            splitter: wrapper::Splitter::new(usize::from(SERVER_MAX_PDU) + 64),
            session: None,
        }
    }

    /// Bytes from the client; what the meter sends back.
    pub fn received(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.splitter.push(bytes);
        let mut out = Vec::new();
        while let Some(r) = self.splitter.next_apdu() {
            let Ok(w) = r else { continue };
            // Another logical device: not this meter's to answer.
            if w.destination != LOGICAL {
                continue;
            }
            if self.session.as_ref().map(Session::client_sap) != Some(w.source) {
                self.session = Some(Session::new(self.meter.clone(), w.source));
            }
            if let Some(answer) = self.session.as_mut().and_then(|s| s.apdu(&w.apdu)) {
                out.extend(wrapper::encode(LOGICAL, w.source, &answer));
            }
        }
        out
    }
}

/// One meter's end of the HDLC link.
#[derive(Debug)]
struct Station {
    meter: Meter,
    connected: bool,
    vs: u8,
    vr: u8,
    max_info_tx: usize,
    client: Address,
    session: Option<Session>,
    incoming: Vec<u8>,
    outgoing: std::collections::VecDeque<Vec<u8>>,
    last_sent: Vec<u8>,
}

impl Station {
    fn frame(&self, control: Control, segmented: bool, info: Vec<u8>) -> Vec<u8> {
        Frame {
            destination: self.client,
            source: Address::server(LOGICAL, Some(self.meter.spec.physical)),
            control,
            segmented,
            info,
        }
        .encode()
    }

    fn next_segment(&mut self) -> Vec<u8> {
        let (control, more, info) = hdlc::next_segment(&mut self.outgoing, &mut self.vs, self.vr);
        self.frame(control, more, info)
    }

    fn handle(&mut self, f: Frame) -> Option<Vec<u8>> {
        self.client = f.source;
        match f.control {
            Control::Snrm => {
                let theirs = Parameters::decode(&f.info).unwrap_or_default();
                let ours = Parameters {
                    max_info_tx: theirs.max_info_rx.min(SERVER_MAX_INFO),
                    max_info_rx: theirs.max_info_tx.min(SERVER_MAX_INFO),
                    window_tx: 1,
                    window_rx: 1,
                };
                self.connected = true;
                self.vs = 0;
                self.vr = 0;
                self.max_info_tx = usize::from(ours.max_info_tx.max(32));
                self.session = Some(Session::new(
                    self.meter.clone(),
                    u16::from(f.source.upper as u8),
                ));
                self.incoming.clear();
                self.outgoing.clear();
                Some(self.frame(Control::Ua, false, ours.encode()))
            }
            Control::Disc => {
                let was = self.connected;
                self.connected = false;
                self.session = None;
                Some(self.frame(if was { Control::Ua } else { Control::Dm }, false, vec![]))
            }
            _ if !self.connected => Some(self.frame(Control::Dm, false, vec![])),
            Control::I { ns, .. } => {
                if ns != self.vr {
                    // A repeat: our answer was lost.
                    return Some(self.last_sent.clone());
                }
                self.vr = (self.vr + 1) & 7;
                self.incoming.extend_from_slice(&f.info);
                if f.segmented {
                    return Some(self.frame(
                        Control::Rr {
                            nr: self.vr,
                            pf: true,
                        },
                        false,
                        vec![],
                    ));
                }
                let info = std::mem::take(&mut self.incoming);
                let apdu = info.strip_prefix(&hdlc::LLC_REQUEST[..])?;
                let answer = self.session.as_mut()?.apdu(apdu)?;
                let mut info = hdlc::LLC_RESPONSE.to_vec();
                info.extend_from_slice(&answer);
                self.outgoing = info.chunks(self.max_info_tx).map(<[u8]>::to_vec).collect();
                Some(self.next_segment())
            }
            Control::Rr { nr, .. } => {
                if !self.outgoing.is_empty() && nr == self.vs {
                    return Some(self.next_segment());
                }
                if nr != self.vs {
                    return Some(self.last_sent.clone());
                }
                Some(self.frame(
                    Control::Rr {
                        nr: self.vr,
                        pf: true,
                    },
                    false,
                    vec![],
                ))
            }
            _ => None,
        }
    }
}

/// HDLC on a line shared by several meters, each answering its physical address (logical
/// address 1) and nothing else.
#[derive(Debug)]
pub struct HdlcServer {
    splitter: hdlc::Splitter,
    stations: Vec<Station>,
}

impl HdlcServer {
    pub fn new(meters: Vec<Meter>) -> Self {
        HdlcServer {
            splitter: hdlc::Splitter::new(),
            stations: meters
                .into_iter()
                .map(|meter| Station {
                    meter,
                    connected: false,
                    vs: 0,
                    vr: 0,
                    max_info_tx: usize::from(SERVER_MAX_INFO),
                    client: Address::client(16),
                    session: None,
                    incoming: Vec::new(),
                    outgoing: Default::default(),
                    last_sent: Vec::new(),
                })
                .collect(),
        }
    }

    /// Whether any meter on the line has an open HDLC connection.
    pub fn connected(&self) -> bool {
        self.stations.iter().any(|s| s.connected)
    }

    /// Drops every connection and half-received frame (the line went quiet, the probe was
    /// taken off).
    pub fn reset(&mut self) {
        self.splitter.clear();
        for s in &mut self.stations {
            s.connected = false;
            s.session = None;
        }
    }

    /// Bytes from the line; what the meters send back. Damaged frames and frames for other
    /// addresses get no answer.
    pub fn received(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.splitter.push(bytes);
        let mut out = Vec::new();
        while let Some(r) = self.splitter.next_frame() {
            let Ok(f) = r else { continue };
            let Some(station) = self
                .stations
                .iter_mut()
                .find(|s| f.destination == Address::server(LOGICAL, Some(s.meter.spec.physical)))
            else {
                continue;
            };
            if let Some(answer) = station.handle(f) {
                station.last_sent = answer.clone();
                out.extend(answer);
            }
        }
        out
    }
}

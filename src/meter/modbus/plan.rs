//! Coalescing: the fewest read requests that cover a set of registers.
//!
//! Registers of one function are sorted by address and merged left to right while the
//! request stays within [`MAX_REGISTERS`] and the unused registers between two entries stay
//! within `max_gap`. Greedy extension is optimal here: any cover of the sorted registers by
//! requests of bounded span can be shifted, request by request, to start where the greedy one
//! starts, without using more requests.

use super::profile::{Function, Register};

/// The most registers one read request may ask for (Modbus application protocol, 6.3/6.4).
pub const MAX_REGISTERS: u16 = 125;

/// One read request and the registers it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub function: Function,
    pub start: u16,
    pub count: u16,
    /// Indices into the register slice the plan was made from.
    pub registers: Vec<usize>,
}

impl Request {
    pub fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// Plans the requests for `registers`.
pub fn plan(registers: &[&Register], max_gap: u16, max_count: u16) -> Vec<Request> {
    let max_count = max_count.clamp(1, MAX_REGISTERS);
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| (registers[i].function, registers[i].address));
    let mut out: Vec<Request> = Vec::new();
    for i in order {
        let r = registers[i];
        if let Some(cur) = out.last_mut() {
            let gap = u32::from(r.address).saturating_sub(cur.end());
            let span = r.end().max(cur.end()) - u32::from(cur.start);
            if cur.function == r.function
                && gap <= u32::from(max_gap)
                && span <= u32::from(max_count)
            {
                cur.count = span as u16;
                cur.registers.push(i);
                continue;
            }
        }
        out.push(Request {
            function: r.function,
            start: r.address,
            count: r.kind.words(),
            registers: vec![i],
        });
    }
    out
}

/// Bytes on the wire for `requests` over RTU: request ADU (8) and response ADU (5 + 2n).
pub fn rtu_bytes(requests: &[Request]) -> u64 {
    requests
        .iter()
        .map(|r| 8 + 5 + 2 * u64::from(r.count))
        .sum()
}

/// Bytes on the wire for `requests` over TCP: MBAP header (7) plus PDU, both ways.
pub fn tcp_bytes(requests: &[Request]) -> u64 {
    requests
        .iter()
        .map(|r| 12 + 9 + 2 * u64::from(r.count))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::modbus::profile::Profiles;

    #[test]
    fn sdm630_should_need_two_requests_when_gaps_may_be_read() {
        let profiles = Profiles::built_in();
        let p = profiles.get("eastron-sdm630").unwrap();
        let regs: Vec<&Register> = p.registers.iter().collect();
        let reqs = plan(&regs, p.max_gap, MAX_REGISTERS);
        let spans: Vec<(u16, u16)> = reqs.iter().map(|r| (r.start, r.count)).collect();
        assert_eq!(spans, [(0x0000, 0x50), (0x0156, 4)]);
        assert_eq!(
            reqs.iter().map(|r| r.registers.len()).sum::<usize>(),
            regs.len()
        );
    }

    #[test]
    fn no_gap_should_split_at_every_hole() {
        let profiles = Profiles::built_in();
        let p = profiles.get("eastron-sdm630").unwrap();
        let regs: Vec<&Register> = p.registers.iter().collect();
        let reqs = plan(&regs, 0, MAX_REGISTERS);
        let spans: Vec<(u16, u16)> = reqs.iter().map(|r| (r.start, r.count)).collect();
        assert_eq!(
            spans,
            [(0x0000, 18), (0x0034, 2), (0x0046, 10), (0x0156, 4)]
        );
    }

    #[test]
    fn requests_should_never_exceed_the_protocol_limit_or_mix_functions() {
        let profiles = Profiles::built_in();
        for p in ["eastron-sdm630", "schneider-iem3155", "carlo-gavazzi-em24"] {
            let p = profiles.get(p).unwrap();
            let regs: Vec<&Register> = p.registers.iter().collect();
            for max in [2u16, 4, 10, 125] {
                for r in plan(&regs, 125, max) {
                    assert!(r.count <= max.max(4));
                    assert!(r.registers.iter().all(|&i| regs[i].function == r.function));
                    assert!(
                        r.registers
                            .iter()
                            .all(|&i| { regs[i].address >= r.start && regs[i].end() <= r.end() })
                    );
                }
            }
        }
    }
}

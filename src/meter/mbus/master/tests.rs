//! Tests of the M-Bus master's exchanges.

use super::*;
use crate::sim::mbus::{Fault, Segment, Slave};

/// Drives `read` against `seg` without I/O: every answer arrives at once, silence when
/// the segment says nothing. Returns the result and the requests sent.
fn drive(seg: &mut Segment, config: ReadConfig) -> (Result<ReadOut, ReadError>, Vec<Vec<u8>>) {
    let mut read = Read::new(config);
    let mut step = read.start();
    let mut sent = Vec::new();
    for _ in 0..200 {
        match step {
            Step::Done(r) => return (r, sent),
            Step::Send { bytes, .. } => {
                sent.push(bytes.clone());
                step = match seg.handle(&bytes) {
                    Some(answer) => match read.received(&answer) {
                        Some(s) => s,
                        None => read.silence(),
                    },
                    None => read.silence(),
                };
            }
        }
    }
    panic!("the read did not end");
}

fn primary(a: u8) -> ReadConfig {
    ReadConfig::primary(a, 2400)
}

#[test]
fn primary_read_should_reset_then_request_with_fcb_set() {
    let mut seg = Segment::demo();
    let (r, sent) = drive(&mut seg, primary(1));
    let out = r.unwrap();
    assert_eq!(
        sent,
        vec![link::snd_nke(1).to_vec(), link::req_ud2(1, true).to_vec()]
    );
    assert_eq!(out.frames.len(), 1);
    assert_eq!(out.identity.unwrap().id_string(), "12345678");
    assert_eq!(out.wire.frames_sent, 2);
    assert_eq!(out.wire.bytes_sent, 10);
}

#[test]
fn multi_telegram_answer_should_toggle_fcb_for_each_telegram() {
    let mut seg = Segment::demo();
    let (r, sent) = drive(&mut seg, primary(3));
    let out = r.unwrap();
    assert_eq!(out.frames.len(), 3);
    let controls: Vec<u8> = sent.iter().map(|f| f[1]).collect();
    assert_eq!(controls, vec![0x40, 0x7B, 0x5B, 0x7B]);
    let records: usize = out.telegrams().map(|t| t.records().count()).sum();
    assert_eq!(records, 7);
}

#[test]
fn lost_answer_should_be_repeated_with_the_same_fcb() {
    let mut seg = Segment::demo();
    seg.slaves[2].fault = Fault::LoseAnswers(1);
    let (r, sent) = drive(&mut seg, primary(3));
    let out = r.unwrap();
    let controls: Vec<u8> = sent.iter().map(|f| f[1]).collect();
    assert_eq!(controls, vec![0x40, 0x7B, 0x7B, 0x5B, 0x7B]);
    // Still three different telegrams, in order, none skipped.
    assert_eq!(out.frames.len(), 3);
    let last = out.telegrams().last().unwrap();
    assert!(!last.more_follows);
}

#[test]
fn endless_telegrams_should_stop_at_the_bound() {
    let mut seg = Segment::demo();
    seg.slaves[2].fault = Fault::EndlessTelegrams;
    let mut c = primary(3);
    c.max_telegrams = 4;
    let (r, sent) = drive(&mut seg, c);
    assert_eq!(r, Err(ReadError::TooManyTelegrams { telegrams: 4 }));
    assert_eq!(sent.len(), 5);
}

#[test]
fn checksum_errors_should_be_retried_then_reported() {
    let mut seg = Segment::demo();
    seg.slaves[0].fault = Fault::BadChecksum(1);
    let (r, _) = drive(&mut seg, primary(1));
    assert!(r.is_ok());
    seg.slaves[0].fault = Fault::BadChecksum(10);
    let (r, sent) = drive(&mut seg, primary(1));
    assert!(
        matches!(
            r,
            Err(ReadError::Corrupt {
                stage: Stage::Request(1),
                tries: 3,
                error: LinkError::Checksum { .. }
            })
        ),
        "{r:?}"
    );
    assert_eq!(sent.len(), 4);
}

#[test]
fn absent_meter_should_be_no_answer_after_the_retries() {
    let mut seg = Segment::demo();
    let (r, sent) = drive(&mut seg, primary(9));
    assert_eq!(
        r,
        Err(ReadError::NoAnswer {
            stage: Stage::Reset,
            tries: 3
        })
    );
    assert_eq!(sent.len(), 3);
}

#[test]
fn secondary_read_should_select_request_and_deselect() {
    let mut seg = Segment::demo();
    let mask = SecondaryMask::parse("23456789").unwrap();
    let (r, sent) = drive(&mut seg, ReadConfig::secondary(mask, 2400));
    let out = r.unwrap();
    assert_eq!(out.identity.unwrap().id_string(), "23456789");
    assert_eq!(sent[0], link::select(false, &mask));
    assert_eq!(sent[1], link::req_ud2(253, true).to_vec());
    assert_eq!(sent[2], link::snd_nke(253).to_vec());
    assert!(seg.slaves.iter().all(|s| s.requests <= 1));
}

#[test]
fn wrong_secondary_answering_should_be_reported() {
    let mut bad = Slave::water(7, "99999999");
    bad.fault = Fault::AnswersAnySelection;
    let mut seg = Segment::new(vec![bad]);
    let mask = SecondaryMask::parse("12345678").unwrap();
    let (r, sent) = drive(&mut seg, ReadConfig::secondary(mask, 2400));
    assert_eq!(
        r,
        Err(ReadError::WrongSecondary {
            expected: "12345678".into(),
            got: "99999999".into(),
            manufacturer: "SEN".into()
        })
    );
    // Deselected even so.
    assert_eq!(sent.last().unwrap(), &link::snd_nke(253).to_vec());
}

#[test]
fn a_wildcard_matching_two_meters_should_be_a_collision() {
    let mut seg = Segment::demo();
    let mask = SecondaryMask::parse("FFFFFFFF").unwrap();
    let (r, _) = drive(&mut seg, ReadConfig::secondary(mask, 2400));
    // Two telegrams ORed: the lengths overlay too, so the "frame" either never completes
    // or fails its checksum; either way a link error, never a telegram.
    assert!(
        matches!(
            r,
            Err(ReadError::Garbled {
                stage: Stage::Request(1),
                ..
            } | ReadError::Truncated {
                stage: Stage::Request(1),
                ..
            } | ReadError::Corrupt {
                stage: Stage::Request(1),
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn application_reset_should_come_before_the_request_when_asked_for() {
    let mut seg = Segment::demo();
    let mut c = primary(3);
    c.application_reset = true;
    let (r, sent) = drive(&mut seg, c);
    assert_eq!(r.unwrap().frames.len(), 3);
    assert_eq!(sent[1], link::app_reset(3, true));
    // The request continues the FCB sequence after the reset.
    assert_eq!(sent[2], link::req_ud2(3, false).to_vec());
}

#[test]
fn partial_answers_should_wait_and_truncated_ones_fail() {
    let mut read = Read::new(ReadConfig {
        retries: 0,
        ..primary(1)
    });
    read.start();
    assert!(read.received(&[]).is_none());
    let Some(Step::Send { .. }) = read.received(&[link::ACK]) else {
        panic!("the ACK should move the read on");
    };
    let frame = Slave::heat(1, "12345678").rsp_ud(0);
    assert!(read.received(&frame[..10]).is_none());
    assert!(matches!(
        read.silence(),
        Step::Done(Err(ReadError::Truncated { bytes: 10, .. }))
    ));
}

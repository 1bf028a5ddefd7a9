//! amr-edge: an agent for meter concentrators. It reads electricity, heat and water meters
//! on a local beat, buffers every reading durably, and drains the buffer to the central AMR
//! system's RabbitMQ queue as Celery tasks whenever the uplink allows.
//!
//! # Layout
//!
//! The modules follow the data: beat → bus → meter driver → store → drain, with control
//! beside them.
//!
//! * [`beat`] — when each meter is read: wall-clock boundaries per cadence.
//! * [`bus`] — one worker per serial port or TCP endpoint, the only owner of its link;
//!   priority queue of polls.
//! * [`meter`] — what to read from a meter, the one driver interface ([`meter::Meter::read`])
//!   and the protocol drivers: [`meter::modbus`] (RTU, TCP; register profiles as data) and
//!   [`meter::iec62056_21`]; the links they run on ([`meter::link`]).
//! * [`store`] — the durable buffer on sled: append, take, ack; eviction when full.
//! * [`drain`] — the store to RabbitMQ as Celery protocol v2 tasks, with publisher confirms.
//! * [`metrics`] — Prometheus metrics and health: `GET /metrics`, `/healthz`, `/readyz`, and
//!   the textfile for node_exporter.
//! * [`control`] — MQTT commands from the centre: on-demand polls, inspect, cancel, status.
//! * [`reading`] — the data model: readings, OBIS series, exact decimals, system events.
//! * [`config`] — the TOML file and its resolution into the typed [`config::Config`] the
//!   agent runs.
//! * [`primitives`] — value types the sections share (durations, sizes, secrets) and the
//!   located errors; a leaf that imports nothing from the crate.
//! * [`agent`] — the wiring of a running agent, signals and reload.
//! * [`status`] — what `amr-edge status` reports, from a running agent or from the store.
//! * [`sim`] — simulated meters for the demo and the tests.
//! * [`clock`], [`backoff`], [`lock`] — the wall clock behind a trait, reconnect backoff,
//!   one agent per data directory.
//! * [`tls`] — telling a certificate the other side refuses from a network that is down.
//! * [`alloc`] — glibc malloc settings that keep a long-running agent's memory small.
//! * [`watchdog`] — systemd readiness and watchdog (`sd_notify`), fed only by a liveness probe.

pub mod agent;
pub mod alloc;
pub mod backoff;
pub mod beat;
pub mod bus;
pub mod clock;
pub mod config;
pub mod control;
pub mod drain;
pub mod lock;
pub mod meter;
pub mod metrics;
pub mod primitives;
pub mod reading;
pub mod sim;
pub mod status;
pub mod store;
pub mod tls;
pub mod watchdog;

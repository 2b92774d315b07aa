//! The SQL side of webhook delivery, shared by the background dispatcher and by
//! `process_jobs()`: claim deliveries, record outcomes. Both run on the Postgres thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{JsonB, PgBuiltInOids, PgOid, PgSqlErrorCode};

use crate::db;
use crate::gucs;
use crate::http::{self, Delivery, HttpClient, HttpSettings, Outcome};
use crate::lanes::WaitingJob;

/// A claimed job, ready to send, or one whose description was unusable and that is already
/// failed (the worker records that instead of panicking).
pub enum Claimed {
    Send(Delivery),
    Unusable(Outcome),
}

pub fn http_settings() -> HttpSettings {
    HttpSettings {
        allowlist: gucs::http_allowlist(),
        ca_file: gucs::http_ca_file(),
        response_max_bytes: gucs::response_max_bytes(),
        max_idle_per_host: gucs::max_in_flight(),
    }
}

/// How this database's SQL takes claims and outcomes: as typed rows and arrays, with claims
/// ahead of free request slots (0.12.0 on) or without (0.10.0 and 0.11.0), or as JSON
/// documents (a database not yet updated with `ALTER EXTENSION queue_ext UPDATE`; the
/// library is shared by every database of the cluster and may be newer than its SQL).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Protocol {
    RowsAhead,
    Rows,
    Json,
}

/// 0: not known yet, then 1 + the variant's index. A process serves one database, so one
/// answer per process, asked again after any failed claim or record (the extension may have
/// been updated, or dropped and created at another version, meanwhile).
static PROTOCOL: AtomicU8 = AtomicU8::new(0);

const PROTOCOLS: [Protocol; 3] = [Protocol::RowsAhead, Protocol::Rows, Protocol::Json];

fn protocol() -> Result<Protocol, pgrx::spi::Error> {
    if let Some(known) = PROTOCOLS.get((PROTOCOL.load(Ordering::Relaxed) as usize).wrapping_sub(1))
    {
        return Ok(*known);
    }
    let (ahead, rows) = Spi::get_two::<bool, bool>(
        "SELECT to_regprocedure('queue_ext._dispatch_claim_rows(text, integer, text[], integer[], text, \
         interval, text[])') IS NOT NULL, \
         to_regprocedure('queue_ext._dispatch_record_rows(uuid[], uuid[], text[], integer[], text[], \
         text[], integer[], text[], float8[], jsonb[], text[], float8[])') IS NOT NULL",
    )?;
    let found = match (ahead, rows) {
        (Some(true), _) => Protocol::RowsAhead,
        (_, Some(true)) => Protocol::Rows,
        _ => Protocol::Json,
    };
    let index = PROTOCOLS.iter().position(|p| *p == found).unwrap_or(0);
    PROTOCOL.store(index as u8 + 1, Ordering::Relaxed);
    Ok(found)
}

/// Forgets the protocol and every statement planned so far, so that the next claim, record
/// or rate-limit question asks the database again and plans afresh: after one of them failed
/// (an ERROR unwinds to the caller's subtransaction, past this module), and at each
/// `process_jobs` call.
pub fn forget_protocol() {
    PROTOCOL.store(0, Ordering::Relaxed);
    PLANS.with(|plans| plans.borrow_mut().take());
    RATE_LIMIT_PLAN.with(|plan| plan.borrow_mut().take());
}

const CLAIM_ROWS: &str = "SELECT job_id, lease_token, attempt, queue_name, body, url, method, header_names, \
     header_values, timeout_ms, secret, follow_redirects \
     FROM queue_ext._dispatch_claim_rows($1, $2, $3, $4, $5, make_interval(secs => $6::float8 / 1000))";

const CLAIM_ROWS_AHEAD: &str = "SELECT job_id, lease_token, attempt, queue_name, body, url, method, header_names, \
     header_values, timeout_ms, secret, follow_redirects, max_in_flight, settings_version \
     FROM queue_ext._dispatch_claim_rows($1, $2, $3, $4, $5, make_interval(secs => $6::float8 / 1000), $7)";

const RECORD_ROWS: &str =
    "SELECT queue_ext._dispatch_record_rows($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// The claim and record of [`Protocol::Rows`] and [`Protocol::RowsAhead`], planned once per
/// process and kept (SPI_keepplan): planned on every turn, they cost the dispatcher ~90 µs a
/// turn.
struct RowsPlans {
    protocol: Protocol,
    claim: OwnedPreparedStatement,
    record: OwnedPreparedStatement,
}

thread_local! {
    /// Forgotten with the protocol; SPI runs on the Postgres thread only.
    static PLANS: RefCell<Option<Rc<RowsPlans>>> = const { RefCell::new(None) };
    /// `_rate_limit_wait`'s statement, once the database has the function (SQL that predates
    /// rate limits is asked again each time: an update may bring it).
    static RATE_LIMIT_PLAN: RefCell<Option<Rc<OwnedPreparedStatement>>> =
        const { RefCell::new(None) };
}

impl RowsPlans {
    fn get(client: &SpiClient<'_>, protocol: Protocol) -> Result<Rc<RowsPlans>, pgrx::spi::Error> {
        if let Some(plans) = PLANS.with(|plans| plans.borrow().clone()) {
            if plans.protocol == protocol {
                return Ok(plans);
            }
        }
        use pgrx::pg_sys::BuiltinOid::*;
        let oids =
            |list: &[PgBuiltInOids]| list.iter().map(|o| PgOid::BuiltIn(*o)).collect::<Vec<_>>();
        let claim_args = [
            TEXTOID,
            INT4OID,
            TEXTARRAYOID,
            INT4ARRAYOID,
            TEXTOID,
            INT8OID,
            TEXTARRAYOID,
        ];
        let claim = match protocol {
            Protocol::RowsAhead => client.prepare_mut(CLAIM_ROWS_AHEAD, &oids(&claim_args))?,
            _ => client.prepare_mut(CLAIM_ROWS, &oids(&claim_args[..6]))?,
        };
        let plans = Rc::new(RowsPlans {
            protocol,
            claim: claim.keep(),
            record: client
                .prepare_mut(
                    RECORD_ROWS,
                    &oids(&[
                        UUIDARRAYOID,
                        UUIDARRAYOID,
                        TEXTARRAYOID,
                        INT4ARRAYOID,
                        TEXTARRAYOID,
                        TEXTARRAYOID,
                        INT4ARRAYOID,
                        TEXTARRAYOID,
                        FLOAT8ARRAYOID,
                        JSONBARRAYOID,
                        TEXTARRAYOID,
                        FLOAT8ARRAYOID,
                    ]),
                )?
                .keep(),
        });
        PLANS.with(|slot| *slot.borrow_mut() = Some(plans.clone()));
        Ok(plans)
    }
}

/// Claims up to `capacity` deliveries (from `only_queue`, or every webhook queue) in the
/// current transaction. `busy` is what the caller already holds per queue (in flight or
/// waiting for a request slot). From the queues in `ahead`, up to twice their
/// webhook_max_in_flight, the second half to wait for a request to the target to end: every
/// [`Delivery`] then carries its queue's `max_in_flight`, which its sender keeps to. (The
/// dispatcher claims ahead from queues whose endpoint answers fast; a `process_jobs` call,
/// which sends what it claims at once, never does.)
pub fn claim(
    worker_id: &str,
    capacity: usize,
    busy: &HashMap<String, u32>,
    only_queue: Option<&str>,
    ahead: &[String],
) -> Result<Vec<Claimed>, pgrx::spi::Error> {
    let capacity = capacity.min(i32::MAX as usize) as i32;
    let default_timeout_ms = gucs::http_timeout().as_millis() as i64;
    let protocol = protocol()?;
    match protocol {
        Protocol::RowsAhead | Protocol::Rows => {
            let request = ClaimRequest {
                worker_id,
                capacity,
                busy,
                only_queue,
                default_timeout_ms,
            };
            claim_rows(&request, protocol, ahead)
        }
        Protocol::Json => claim_json(worker_id, capacity, busy, only_queue, default_timeout_ms),
    }
}

struct ClaimRequest<'a> {
    worker_id: &'a str,
    capacity: i32,
    busy: &'a HashMap<String, u32>,
    only_queue: Option<&'a str>,
    default_timeout_ms: i64,
}

fn claim_rows(
    request: &ClaimRequest<'_>,
    protocol: Protocol,
    ahead: &[String],
) -> Result<Vec<Claimed>, pgrx::spi::Error> {
    let ClaimRequest {
        worker_id,
        capacity,
        busy,
        only_queue,
        default_timeout_ms,
    } = *request;
    let slots = protocol == Protocol::RowsAhead;
    let (busy_queues, busy_counts): (Vec<String>, Vec<i32>) = busy
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(q, n)| (q.clone(), (*n).min(i32::MAX as u32) as i32))
        .unzip();
    Spi::connect_mut(|client| {
        let plans = RowsPlans::get(client, protocol)?;
        let mut args = vec![
            worker_id.into(),
            capacity.into(),
            busy_queues.into(),
            busy_counts.into(),
            only_queue.into(),
            default_timeout_ms.into(),
        ];
        if slots {
            args.push(ahead.to_vec().into());
        }
        let rows = client.update(&plans.claim, None, &args)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id = |n| -> Result<String, pgrx::spi::Error> {
                Ok(row
                    .get::<pgrx::Uuid>(n)?
                    .map(|u| u.to_string())
                    .unwrap_or_default())
            };
            let names = row.get::<Vec<Option<String>>>(8)?.unwrap_or_default();
            let values = row.get::<Vec<Option<String>>>(9)?.unwrap_or_default();
            let headers = names
                .into_iter()
                .zip(values)
                .filter_map(|(k, v)| Some((k?, serde_json::Value::String(v?))))
                .collect();
            claimed.push(Claimed::Send(Delivery {
                job_id: id(1)?,
                lease_token: id(2)?,
                attempt: row.get::<i32>(3)?.unwrap_or(0),
                queue_name: row.get::<String>(4)?.unwrap_or_default(),
                body: row.get::<String>(5)?.unwrap_or_default(),
                url: row.get::<String>(6)?,
                method: row.get::<String>(7)?.unwrap_or_default(),
                headers,
                timeout_ms: row.get::<i64>(10)?.unwrap_or(0),
                secret: row.get::<String>(11)?,
                follow_redirects: row.get::<bool>(12)?.unwrap_or(false),
                max_in_flight: if slots {
                    row.get::<i32>(13)?.and_then(|n| u32::try_from(n).ok())
                } else {
                    None
                },
                settings_version: if slots { row.get::<i64>(14)? } else { None },
            }));
        }
        Ok(claimed)
    })
}

/// The claim of a database whose SQL predates [`Protocol::Rows`].
fn claim_json(
    worker_id: &str,
    capacity: i32,
    busy: &HashMap<String, u32>,
    only_queue: Option<&str>,
    default_timeout_ms: i64,
) -> Result<Vec<Claimed>, pgrx::spi::Error> {
    let busy_json = serde_json::to_value(busy).unwrap_or_default();
    let claimed = Spi::get_one_with_args::<JsonB>(
        "SELECT queue_ext._dispatch_claim($1, $2, $3, $4, make_interval(secs => $5::float8 / 1000))",
        &[
            worker_id.into(),
            capacity.into(),
            JsonB(busy_json).into(),
            only_queue.into(),
            default_timeout_ms.into(),
        ],
    )?;
    let items = match claimed.map(|j| j.0) {
        Some(serde_json::Value::Array(items)) => items,
        _ => Vec::new(),
    };
    Ok(items.into_iter().filter_map(parse_claimed).collect())
}

/// Claims like [`claim`], so that one queue whose claim fails (bad data, a trigger that
/// raises) cannot stop the others. The claim over every queue runs in a subtransaction; if
/// it fails, each webhook queue is claimed alone, in a subtransaction of its own. Returns
/// what was claimed and, for each queue that could not be, its error.
pub fn claim_isolated(
    worker_id: &str,
    capacity: usize,
    busy: &HashMap<String, u32>,
    ahead: &[String],
) -> (Vec<Claimed>, Vec<(String, db::DbError)>) {
    let whole = match db::isolated(|| claim(worker_id, capacity, busy, None, ahead)) {
        Ok(claimed) => return (claimed, Vec::new()),
        Err(e) => e,
    };
    forget_protocol();
    let queues = db::isolated(|| {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT queue_name FROM queue_ext.queues WHERE is_webhook AND NOT paused ORDER BY random()",
                    None,
                    &[],
                )?
                .map(|row| row.get::<String>(1))
                .collect::<Result<Vec<_>, _>>()
        })
    });
    let queues = match queues {
        Ok(q) => q.into_iter().flatten().collect::<Vec<_>>(),
        Err(_) => return (Vec::new(), vec![("every queue".into(), whole)]),
    };
    let mut claimed = Vec::new();
    let mut failed = Vec::new();
    for queue in queues {
        let room = capacity.saturating_sub(claimed.len());
        if room == 0 {
            break;
        }
        match db::isolated(|| claim(worker_id, room, busy, Some(&queue), ahead)) {
            Ok(mut c) => claimed.append(&mut c),
            Err(e) => failed.push((queue, e)),
        }
    }
    (claimed, failed)
}

/// How long until a rate-limited webhook job may be claimed, if one is held back.
/// (None while the database still runs queue_ext 0.1.0, which has no rate limits.)
pub fn rate_limit_wait() -> Result<Option<std::time::Duration>, pgrx::spi::Error> {
    Spi::connect(|client| {
        let plan = match RATE_LIMIT_PLAN.with(|plan| plan.borrow().clone()) {
            Some(plan) => plan,
            None => {
                let has_limits = client
                    .select(
                        "SELECT to_regprocedure('queue_ext._rate_limit_wait()') IS NOT NULL",
                        None,
                        &[],
                    )?
                    .first()
                    .get_one::<bool>()?;
                if has_limits != Some(true) {
                    return Ok(None);
                }
                let plan = Rc::new(
                    client
                        .prepare(
                            "SELECT extract(epoch FROM queue_ext._rate_limit_wait())::float8 * 1000",
                            &[],
                        )?
                        .keep(),
                );
                RATE_LIMIT_PLAN.with(|slot| *slot.borrow_mut() = Some(plan.clone()));
                plan
            }
        };
        let ms = client.select(&*plan, None, &[])?.first().get_one::<f64>()?;
        Ok(ms
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| std::time::Duration::from_micros((ms * 1000.0) as u64)))
    })
}

fn parse_claimed(item: serde_json::Value) -> Option<Claimed> {
    match serde_json::from_value::<Delivery>(item.clone()) {
        Ok(d) => Some(Claimed::Send(d)),
        Err(e) => {
            // Fail the job with the reason if we can name it; it cannot be sent as it is.
            let text = |k: &str| item.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let (job_id, lease_token) = (text("job_id")?, text("lease_token")?);
            let d = Delivery {
                job_id,
                lease_token,
                queue_name: text("queue_name").unwrap_or_default(),
                attempt: item.get("attempt").and_then(|v| v.as_i64()).unwrap_or(0) as i32,
                body: String::new(),
                url: text("url"),
                method: String::new(),
                headers: Default::default(),
                timeout_ms: 0,
                secret: None,
                follow_redirects: false,
                max_in_flight: None,
                settings_version: None,
            };
            Some(Claimed::Unusable(Outcome::from_error(
                &d,
                &http::DeliveryError::unusable(&e),
                std::time::Instant::now(),
            )))
        }
    }
}

/// Records outcomes in the current transaction; returns how many changed their job.
pub fn record(outcomes: &[Outcome]) -> Result<i32, pgrx::spi::Error> {
    if outcomes.is_empty() {
        return Ok(0);
    }
    match protocol()? {
        protocol @ (Protocol::RowsAhead | Protocol::Rows) => record_rows(outcomes, protocol),
        Protocol::Json => record_json(outcomes),
    }
}

/// Puts jobs claimed but never sent back in their queues, their attempt not counted, and
/// cancels those whose cancellation was asked for; `reason` goes in the others' history.
/// Returns how many went.
pub fn return_unsent(deliveries: &[&Delivery], reason: &str) -> Result<i32, pgrx::spi::Error> {
    let ids: Vec<pgrx::Uuid> = deliveries.iter().map(|d| uuid_of(&d.job_id)).collect();
    let tokens: Vec<pgrx::Uuid> = deliveries.iter().map(|d| uuid_of(&d.lease_token)).collect();
    Ok(Spi::get_one_with_args::<i32>(
        "SELECT queue_ext._return_unsent($1, $2, $3)",
        &[ids.into(), tokens.into(), reason.into()],
    )?
    .unwrap_or(0))
}

/// Of `waiting` (jobs held unsent), those not to send, by id, each with the reason that goes
/// in its history: their queue is paused, their cancellation was asked for, the webhook
/// settings of their target changed since their claim, or they are no longer ours to send (the
/// queue was dropped with them, or the lease is gone, and there is nothing to give back).
pub fn unsent_to_withdraw(
    waiting: &[WaitingJob],
) -> Result<HashMap<String, String>, pgrx::spi::Error> {
    let ids: Vec<pgrx::Uuid> = waiting.iter().map(|w| uuid_of(&w.job_id)).collect();
    let tokens: Vec<pgrx::Uuid> = waiting.iter().map(|w| uuid_of(&w.lease_token)).collect();
    let versions: Vec<Option<i64>> = waiting.iter().map(|w| w.settings_version).collect();
    // Only a claim of Protocol::RowsAhead gives its jobs a settings version, and only its
    // SQL has the column.
    let settings_changed = if protocol()? == Protocol::RowsAhead {
        "OR (u.version IS NOT NULL AND u.version IS DISTINCT FROM \
             (SELECT w.settings_version FROM queue_ext.webhook_targets AS w \
              WHERE w.queue_name = CASE WHEN j.queue_name = 'queue_ext.callbacks' \
                                        THEN j.payload ->> 'queue' ELSE j.queue_name END))"
    } else {
        ""
    };
    let query = format!(
        "SELECT u.id::text, \
                CASE WHEN j.id IS NULL THEN 'not sent: no longer held' \
                     WHEN j.cancel_requested IS NOT NULL THEN 'not sent: cancelled' \
                     WHEN q.paused IS NOT FALSE THEN 'not sent: its queue was paused' \
                     ELSE 'not sent: its webhook settings changed' END \
         FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS u(id, token, version) \
         LEFT JOIN queue_ext.job_queue AS j \
                ON j.id = u.id AND j.lease_token = u.token AND j.status = 'running' \
         LEFT JOIN queue_ext.queues AS q ON q.queue_name = j.queue_name \
         WHERE j.id IS NULL OR q.paused IS NOT FALSE OR j.cancel_requested IS NOT NULL \
               {settings_changed}"
    );
    Spi::connect(|client| {
        client
            .select(&query, None, &[ids.into(), tokens.into(), versions.into()])?
            .map(|row| Ok((row.get::<String>(1)?, row.get::<String>(2)?)))
            .filter_map(|pair: Result<_, pgrx::spi::Error>| match pair {
                Ok((Some(id), Some(reason))) => Some(Ok((id, reason))),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect()
    })
}

/// A job id or lease token as the uuid it is (they come from the claim, so always valid;
/// the nil uuid, which matches no job, if not).
fn uuid_of(text: &str) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*uuid::Uuid::parse_str(text).unwrap_or_default().as_bytes())
}

fn record_rows(outcomes: &[Outcome], protocol: Protocol) -> Result<i32, pgrx::spi::Error> {
    let n = outcomes.len();
    let mut job_ids = Vec::with_capacity(n);
    let mut lease_tokens = Vec::with_capacity(n);
    let mut queue_names = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut urls = Vec::with_capacity(n);
    let mut verdicts = Vec::with_capacity(n);
    let mut status_codes = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut retry_after = Vec::with_capacity(n);
    for o in outcomes {
        job_ids.push(uuid_of(&o.job_id));
        lease_tokens.push(uuid_of(&o.lease_token));
        queue_names.push(o.queue_name.as_str());
        attempts.push(o.attempt);
        urls.push(o.url.as_str());
        verdicts.push(o.outcome);
        status_codes.push(o.status_code.map(i32::from));
        errors.push(o.error.as_deref());
        durations.push(o.duration_ms);
        headers.push(o.response_headers.clone().map(JsonB));
        bodies.push(o.response_body.as_deref());
        retry_after.push(o.retry_after_ms.map(|ms| ms as f64));
    }
    let args = [
        job_ids.into(),
        lease_tokens.into(),
        queue_names.into(),
        attempts.into(),
        urls.into(),
        verdicts.into(),
        status_codes.into(),
        errors.into(),
        durations.into(),
        headers.into(),
        bodies.into(),
        retry_after.into(),
    ];
    Spi::connect_mut(|client| {
        let plans = RowsPlans::get(client, protocol)?;
        Ok(client
            .update(&plans.record, None, &args)?
            .first()
            .get_one::<i32>()?
            .unwrap_or(0))
    })
}

/// The record of a database whose SQL predates [`Protocol::Rows`].
fn record_json(outcomes: &[Outcome]) -> Result<i32, pgrx::spi::Error> {
    let json = serde_json::to_value(outcomes).unwrap_or_default();
    Ok(Spi::get_one_with_args::<i32>(
        "SELECT queue_ext._dispatch_record($1)",
        &[JsonB(json).into()],
    )?
    .unwrap_or(0))
}

/// What `record_isolated` does with an outcome that cannot be stored even without what came
/// back from the endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unstorable {
    /// Fail its job permanently (dead letter queue, with the reason): nothing will try again.
    Bury,
    /// Give it back to the caller to try again in a later transaction when the error is
    /// about the database rather than the outcome (`DbError::is_about_the_database`): a
    /// transaction that began before an `ALTER EXTENSION ... UPDATE` committed and ran some of
    /// the old functions against the new tables, a lock or statement timeout. A delivered
    /// webhook must not go to the dead letter queue for that (redriving it would send it
    /// twice). Other errors (a trigger refusing the row, bad data) are buried as with `Bury`.
    Keep,
}

/// Records outcomes so that no SQL error can stop the caller or loop a job. The batch is
/// recorded in one subtransaction; if that fails, each outcome alone. An outcome that still
/// fails is recorded without what came back from the endpoint (the verdict stands: a
/// delivered job is not sent again); if even that fails, it is buried or kept (`Unstorable`).
/// Returns a line for each outcome that needed more than one try, for the log, and the kept
/// outcomes.
pub fn record_isolated(
    outcomes: &[Outcome],
    unstorable: Unstorable,
) -> (Vec<String>, Vec<Outcome>) {
    let mut notes = Vec::new();
    let mut kept = Vec::new();
    if outcomes.is_empty() || db::isolated(|| record(outcomes)).is_ok() {
        return (notes, kept);
    }
    forget_protocol();
    for o in outcomes {
        let error = match db::isolated(|| record(std::slice::from_ref(o))) {
            Ok(_) => continue,
            Err(e) => e,
        };
        let note = format!("the outcome could not be stored as it came back ({error})");
        let mut bare = o.clone();
        bare.response_headers = None;
        bare.response_body = None;
        bare.error = Some(match &o.error {
            Some(text) => format!("{text}; {note}"),
            None => note.clone(),
        });
        let bare_error = match db::isolated(|| record(std::slice::from_ref(&bare))) {
            Ok(_) => {
                notes.push(format!(
                    "job {}: {note}; recorded without the response",
                    o.job_id
                ));
                continue;
            }
            Err(e) => e,
        };
        if unstorable == Unstorable::Keep && bare_error.is_about_the_database() {
            notes.push(format!(
                "job {}: {note}; kept to record in a later transaction",
                o.job_id
            ));
            kept.push(o.clone());
            continue;
        }
        let reason = format!("{}: recording the outcome failed: {error}", o.outcome);
        let buried = db::isolated(|| {
            Spi::get_one_with_args::<String>(
                "SELECT queue_ext._fail($1::uuid, $2, $3::uuid, true, NULL)::text",
                &[
                    o.job_id.as_str().into(),
                    reason.as_str().into(),
                    o.lease_token.as_str().into(),
                ],
            )
        });
        // The attempt still belongs in the delivery log (without what came back).
        let _ = db::isolated(|| {
            Spi::run_with_args(
                "INSERT INTO queue_ext.webhook_deliveries (job_id, queue_name, attempt, url, outcome, \
                 status_code, error, duration_ms) VALUES ($1::uuid, $2, $3, $4, 'failed', $5, $6, $7)",
                &[
                    o.job_id.as_str().into(),
                    o.queue_name.as_str().into(),
                    o.attempt.into(),
                    o.url.as_str().into(),
                    o.status_code.map(i32::from).into(),
                    reason.as_str().into(),
                    o.duration_ms.into(),
                ],
            )
        });
        notes.push(match buried {
            Ok(_) => format!("job {}: {note}; moved to the dead letter queue", o.job_id),
            Err(e) => format!(
                "job {}: {note}; failing it failed too ({e}); its lease will expire",
                o.job_id
            ),
        });
    }
    (notes, kept)
}

/// Why `process_jobs` could not run; one SQLSTATE each.
#[derive(Debug, thiserror::Error)]
enum ProcessJobsError {
    /// The HTTP runtime's threads could not be started (out of resources).
    #[error("{0}")]
    Runtime(String),
    /// The HTTP settings cannot be used (an unreadable queue_ext.http_ca_file).
    #[error("{0}")]
    Settings(String),
    /// SPI refused a statement of ours.
    #[error("{0}")]
    Spi(pgrx::spi::Error),
}

impl ProcessJobsError {
    fn raise(self) -> ! {
        let code = match self {
            ProcessJobsError::Runtime(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
            ProcessJobsError::Settings(_) => PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            ProcessJobsError::Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        };
        ereport!(ERROR, code, format!("queue_ext.process_jobs: {self}"));
    }
}

/// The runtime a backend uses for `process_jobs`, made on first use.
fn backend_runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            http::new_runtime(1).map_err(|e| format!("cannot start the HTTP runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The backend's client, rebuilt when the settings changed since the last call.
fn backend_client() -> Result<HttpClient, String> {
    static CLIENT: Mutex<Option<(HttpSettings, HttpClient)>> = Mutex::new(None);
    let settings = http_settings();
    let mut cached = CLIENT
        .lock()
        .map_err(|_| "HTTP client lock poisoned".to_string())?;
    match cached.as_ref() {
        Some((s, client)) if *s == settings => Ok(client.clone()),
        _ => {
            let client = HttpClient::new(&settings)?;
            *cached = Some((settings, client.clone()));
            Ok(client)
        }
    }
}

/// Delivers up to `max_jobs` due jobs of a webhook queue now, from this session, and
/// records the outcomes in the caller's transaction. For databases where the dispatcher
/// cannot run (no shared_preload_libraries), e.g. from pg_cron every few seconds.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn process_jobs(
    queue_name: &str,
    max_jobs: default!(i32, 10),
) -> TableIterator<
    'static,
    (
        name!(job_id, String),
        name!(outcome, String),
        name!(status_code, Option<i32>),
        name!(error, Option<String>),
    ),
> {
    if !(1..=10_000).contains(&max_jobs) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_jobs must be between 1 and 10000 (got {max_jobs})")
        );
    }
    // Raises the usual "queue does not exist" error.
    let is_webhook = Spi::get_one_with_args::<bool>(
        "SELECT (queue_ext._queue($1)).is_webhook",
        &[queue_name.into()],
    )
    .unwrap_or_else(|e| ProcessJobsError::Spi(e).raise())
    .unwrap_or(false);
    if !is_webhook {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("queue \"{queue_name}\" has no webhook_url"),
            "Give it one with queue_ext.alter_queue(queue_name, webhook_url => ...)."
        );
    }
    // A session may outlive an ALTER EXTENSION ... UPDATE: ask its SQL each time.
    forget_protocol();
    let rt = backend_runtime().unwrap_or_else(|e| ProcessJobsError::Runtime(e).raise());
    let client = backend_client().unwrap_or_else(|e| ProcessJobsError::Settings(e).raise());
    // SAFETY: reading this backend's pid.
    let worker_id = format!("process_jobs:{}", unsafe { pg_sys::MyProcPid });
    let claimed = claim(
        &worker_id,
        max_jobs as usize,
        &HashMap::new(),
        Some(queue_name),
        &[],
    )
    .unwrap_or_else(|e| ProcessJobsError::Spi(e).raise());

    let mut outcomes = Vec::with_capacity(claimed.len());
    let mut handles = Vec::new();
    for c in claimed {
        match c {
            Claimed::Send(d) => {
                let client = client.clone();
                handles.push(rt.spawn(async move { client.deliver(d).await }));
            }
            Claimed::Unusable(o) => outcomes.push(o),
        }
    }
    for handle in handles {
        // The tasks run on the runtime's own threads; this thread only waits.
        if let Ok(outcome) = rt.block_on(handle) {
            outcomes.push(outcome);
        }
    }
    // No later transaction to try again in: this call's caller owns the transaction.
    for note in record_isolated(&outcomes, Unstorable::Bury).0 {
        pgrx::warning!("queue_ext.process_jobs: {note}");
    }
    TableIterator::new(outcomes.into_iter().map(|o| {
        (
            o.job_id,
            o.outcome.to_string(),
            o.status_code.map(i32::from),
            o.error,
        )
    }))
}

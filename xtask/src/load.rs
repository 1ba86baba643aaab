//! A bounded load generator for `peft serve`: a fixed list of requests sent by a fixed number of
//! concurrent clients over loopback, stopping at a time limit; every answer is kept with its
//! latency, so that lost and wrong responses can be counted, not guessed.

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status (0: no answer: connection failed or the time limit cut it).
    pub status: u16,
    /// `choices[0].text` of a 200.
    pub text: String,
    /// `usage.completion_tokens` of a 200.
    pub completion_tokens: u64,
    /// Seconds from send to the whole answer.
    pub latency_s: f64,
}

/// What a run produced: an answer per request (`None`: not sent before the time limit).
#[derive(Debug)]
pub struct LoadRun {
    /// Seconds from the first send to the last answer.
    pub wall_s: f64,
    /// Per request, in the order given.
    pub answers: Vec<Option<Answer>>,
}

impl LoadRun {
    /// Requests answered 200.
    pub fn ok(&self) -> usize {
        self.answers
            .iter()
            .flatten()
            .filter(|a| a.status == 200)
            .count()
    }

    /// Requests not answered 200 (errors, and requests never sent).
    pub fn lost(&self) -> usize {
        self.answers.len() - self.ok()
    }

    /// Completion tokens of the 200s.
    pub fn tokens(&self) -> u64 {
        self.answers
            .iter()
            .flatten()
            .filter(|a| a.status == 200)
            .map(|a| a.completion_tokens)
            .sum()
    }

    /// Latencies of the 200s, sorted.
    pub fn latencies(&self) -> Vec<f64> {
        let mut l: Vec<f64> = self
            .answers
            .iter()
            .flatten()
            .filter(|a| a.status == 200)
            .map(|a| a.latency_s)
            .collect();
        l.sort_by(f64::total_cmp);
        l
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank; 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Refuses a URL whose host is not a loopback address: the generator is for this machine's own
/// server only.
pub fn check_loopback(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url {url:?}: only http:// on loopback is load-tested"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<IpAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| format!("--url {url:?}: {e}"))?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() || !addrs.iter().all(IpAddr::is_loopback) {
        return Err(format!(
            "--url {url:?}: not a loopback address; the load generator only targets this machine"
        ));
    }
    Ok(())
}

/// Sends `bodies` to `POST {url}{path}` from `clients` concurrent clients (each takes the next
/// request when its last is answered); no request is sent after `time_limit`, and none waits for
/// its answer longer than it. `api_key` goes in an `Authorization: Bearer` header.
pub fn run(
    url: &str,
    path: &str,
    bodies: &[String],
    clients: usize,
    time_limit: Duration,
    api_key: Option<&str>,
) -> LoadRun {
    let next = AtomicUsize::new(0);
    let answers: Mutex<Vec<Option<Answer>>> = Mutex::new(vec![None; bodies.len()]);
    let start = Instant::now();
    let deadline = start + time_limit;
    std::thread::scope(|scope| {
        for _ in 0..clients.clamp(1, bodies.len().max(1)) {
            scope.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(time_limit))
                    .build()
                    .into();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= bodies.len() || Instant::now() >= deadline {
                        return;
                    }
                    let sent = Instant::now();
                    let mut request = agent
                        .post(format!("{url}{path}"))
                        .header("Content-Type", "application/json");
                    if let Some(key) = api_key {
                        request = request.header("Authorization", format!("Bearer {key}"));
                    }
                    let answer = match request.send(bodies[i].as_str()) {
                        Ok(mut response) => {
                            let status = response.status().as_u16();
                            let body: Value = response
                                .body_mut()
                                .read_to_string()
                                .ok()
                                .and_then(|t| serde_json::from_str(&t).ok())
                                .unwrap_or(Value::Null);
                            Answer {
                                status,
                                text: body["choices"][0]["text"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string(),
                                completion_tokens: body["usage"]["completion_tokens"]
                                    .as_u64()
                                    .unwrap_or(0),
                                latency_s: sent.elapsed().as_secs_f64(),
                            }
                        }
                        Err(_) => Answer {
                            status: 0,
                            text: String::new(),
                            completion_tokens: 0,
                            latency_s: sent.elapsed().as_secs_f64(),
                        },
                    };
                    answers.lock().expect("no client panics holding it")[i] = Some(answer);
                }
            });
        }
    });
    LoadRun {
        wall_s: start.elapsed().as_secs_f64(),
        answers: answers.into_inner().expect("no client panicked holding it"),
    }
}

/// `cargo xtask load`: a bounded load against a running `peft serve` on this machine.
#[derive(clap::Args)]
pub struct LoadArgs {
    /// The server (loopback only), e.g. http://127.0.0.1:8000.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Models to spread the requests over, comma separated (adapter names or the base's).
    #[arg(long, value_delimiter = ',', required = true)]
    models: Vec<String>,
    /// The prompt of every request.
    #[arg(long, default_value = "Once upon a time")]
    prompt: String,
    /// Requests in all.
    #[arg(long, default_value_t = 128)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Seconds after which no request is sent, nor waited for.
    #[arg(long, default_value_t = 300)]
    time_limit: u64,
    /// Bearer key, when the server has one.
    #[arg(long, env = "PEFT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

pub fn load(args: &LoadArgs) -> Result<(), String> {
    check_loopback(&args.url)?;
    if args.requests == 0 || args.clients == 0 || args.max_tokens == 0 || args.time_limit == 0 {
        return Err("--requests, --clients, --max-tokens and --time-limit must be >= 1".into());
    }
    let bodies: Vec<String> = (0..args.requests)
        .map(|i| {
            serde_json::json!({
                "model": args.models[i % args.models.len()], "prompt": args.prompt,
                "max_tokens": args.max_tokens, "temperature": 0,
            })
            .to_string()
        })
        .collect();
    let run = run(
        args.url.trim_end_matches('/'),
        "/v1/completions",
        &bodies,
        args.clients,
        Duration::from_secs(args.time_limit),
        args.api_key.as_deref(),
    );
    let latencies = run.latencies();
    println!(
        "{} requests, {} clients: {} answered 200, {} lost; {:.1} generated tokens/s; latency p50 {:.3} s, p99 {:.3} s; {:.1} s",
        bodies.len(),
        args.clients,
        run.ok(),
        run.lost(),
        run.tokens() as f64 / run.wall_s,
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        run.wall_s
    );
    if run.lost() > 0 {
        return Err(format!("{} requests lost", run.lost()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_load_tested() {
        assert!(check_loopback("http://127.0.0.1:8000").is_ok());
        assert!(check_loopback("http://localhost:9/x").is_ok());
        assert!(check_loopback("http://[::1]:8000").is_ok());
        assert!(check_loopback("http://8.8.8.8:80").is_err());
        assert!(check_loopback("https://127.0.0.1:8000").is_err());
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.0);
        assert_eq!(quantile(&v, 0.99), 4.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}

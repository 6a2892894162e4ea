//! The server's protection of the one shared engine, through its socket
//! protocol, on a real model (SmolLM2, `scripts/fetch-models.sh smollm2`):
//! a cancelled request stops within one forward pass (counted in passes, not
//! seconds), and no request gets more tokens per text, texts per request or
//! texts per layer selection than the server's limits allow.

use kvembed_proto::{self as proto, EmbedOptions, Request, Response, Role, SelectOptions, Status};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> String {
    let dir = std::env::var("KVEMBED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-models.sh smollm2",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

/// A `kvembed serve` process on a private socket, killed when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.socket.parent().unwrap());
    }
}

impl Server {
    fn start(name: &str, extra: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!("kvembed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("engine.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_kvembed"))
            .args([
                "serve",
                "--socket",
                socket.to_str().unwrap(),
                "--model",
                &model(),
                "--threads",
                "2",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start kvembed serve");
        let server = Server { child, socket };
        let started = Instant::now();
        loop {
            if let Ok(mut c) = server.try_connect() {
                if c.status().state == proto::EngineState::Ready {
                    return server;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the server did not get ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_connect(&self) -> std::io::Result<Conn> {
        let mut c = Conn(UnixStream::connect(&self.socket)?);
        match c.call(&Request::Hello {
            version: proto::PROTOCOL_VERSION,
        })? {
            Response::Hello { .. } => Ok(c),
            other => panic!("unexpected greeting {other:?}"),
        }
    }

    fn connect(&self) -> Conn {
        self.try_connect().expect("connect to the server")
    }
}

struct Conn(UnixStream);

impl Conn {
    fn call(&mut self, r: &Request) -> std::io::Result<Response> {
        proto::write_json(&mut self.0, r)?;
        proto::read_json(&mut self.0)
    }

    fn status(&mut self) -> Status {
        match self.call(&Request::Status).unwrap() {
            Response::Status(s) => s,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Embeds and returns (vectors, truncations) or the error.
    fn embed(
        &mut self,
        texts: Vec<String>,
        options: EmbedOptions,
    ) -> Result<(Vec<Vec<f32>>, Vec<proto::Truncation>), (proto::ErrorKind, String)> {
        match self
            .call(&Request::Embed {
                texts,
                role: Role::Document,
                options,
                caller: Default::default(),
            })
            .unwrap()
        {
            Response::Embeddings {
                count,
                dim,
                truncated,
                ..
            } => {
                let values = proto::read_f32s_exact(&mut self.0, count * dim).unwrap();
                Ok((values.chunks(dim).map(<[f32]>::to_vec).collect(), truncated))
            }
            Response::Error { kind, message } => Err((kind, message)),
            Response::TooLong { index, tokens, max } => Err((
                proto::ErrorKind::TooLong,
                format!("text {index} has {tokens:?} tokens, more than {max}"),
            )),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("text number {i}: a short sentence about topic {}", i % 17))
        .collect()
}

#[test]
fn a_cancelled_request_stops_within_one_forward_pass() {
    // A small pass budget makes the request hundreds of passes long.
    let server = Server::start("cancel", &["--batch-tokens", "256"]);
    let mut watcher = server.connect();
    let before = watcher.status().forward_passes;

    let mut victim = server.connect();
    proto::write_json(
        &mut victim.0,
        &Request::Embed {
            texts: texts(3000),
            role: Role::Document,
            options: EmbedOptions::default(),
            caller: proto::Caller {
                database: "db".into(),
                role: "victim".into(),
            },
        },
    )
    .unwrap();
    // Let it run a few passes, then go away as a cancelled statement does.
    let started = Instant::now();
    while watcher.status().forward_passes < before + 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the request never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(victim);
    let at_cancel = watcher.status().forward_passes;

    // The next request is served as soon as the cancelled one has stopped
    // (requests run one after the other), and needs one pass itself.
    let mut other = server.connect();
    other
        .embed(vec!["the next statement".into()], EmbedOptions::default())
        .unwrap();
    let after = watcher.status().forward_passes;
    assert!(
        after - at_cancel <= 2,
        "{} passes ran after the cancel: only the one running then and the next request's own may",
        after - at_cancel
    );
    // And the cancelled request really was far from done.
    let (_, _) = other
        .embed(texts(3000)[..8].to_vec(), EmbedOptions::default())
        .unwrap();
    assert!(
        at_cancel - before < 50,
        "the cancel came late: {} passes had run",
        at_cancel - before
    );
    // The metrics count it as a cancelled statement (57014) of its caller,
    // and the others' requests as served.
    let started = Instant::now();
    loop {
        let rows = match watcher.call(&Request::Stats { reset: false }).unwrap() {
            Response::Stats { rows, .. } => rows,
            other => panic!("unexpected {other:?}"),
        };
        let victim = rows.iter().find(|r| r.role == "victim");
        if let Some(v) = victim.filter(|v| !v.errors.is_empty()) {
            assert_eq!((v.requests, v.texts), (1, 0), "{v:?}");
            assert_eq!(v.errors.get(proto::SQLSTATE_CANCELED), Some(&1), "{v:?}");
            let others = rows
                .iter()
                .find(|r| r.role.is_empty())
                .expect("the other caller");
            assert_eq!((others.requests, others.texts), (2, 9), "{others:?}");
            assert!(
                others.inference_p50_ms > 0.0 && others.errors.is_empty(),
                "{others:?}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cancelled request is not in the metrics: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn no_request_goes_above_the_servers_limits() {
    let server = Server::start(
        "limits",
        &[
            "--max-tokens-limit",
            "32",
            "--max-calibration-texts",
            "40",
            "--batch-tokens",
            "4096",
        ],
    );
    let mut c = server.connect();
    let status = c.status();
    assert_eq!(status.first().max_tokens_limit, 32);
    assert_eq!(
        status.first().max_tokens,
        32,
        "the default may not exceed the limit"
    );
    assert_eq!(status.max_calibration_texts, 40);

    let long = "lorem ipsum dolor sit amet ".repeat(60); // ~300 tokens
                                                         // Asking for more tokens than the limit truncates to the limit...
    let wide = EmbedOptions {
        max_tokens: Some(100_000),
        ..Default::default()
    };
    let (v_wide, truncated) = c.embed(vec![long.clone()], wide).unwrap();
    assert_eq!(truncated.len(), 1, "{truncated:?}");
    assert_eq!(truncated[0].kept, 32);
    assert!(truncated[0].tokens > 200, "{truncated:?}");
    // ... and gives exactly what 32 tokens give.
    let at_limit = EmbedOptions {
        max_tokens: Some(32),
        ..Default::default()
    };
    let (v_limit, _) = c.embed(vec![long.clone()], at_limit).unwrap();
    assert_eq!(v_wide, v_limit);
    // With truncation off the text is refused, never run in full; the
    // refusal names the text by its place in the request and its length.
    let strict = EmbedOptions {
        max_tokens: Some(100_000),
        truncate: Some(false),
        ..Default::default()
    };
    let passes = c.status().forward_passes;
    let request = Request::Embed {
        texts: vec!["short".into(), long],
        role: Role::Document,
        options: strict.clone(),
        caller: Default::default(),
    };
    match c.call(&request).unwrap() {
        Response::TooLong {
            index: 1,
            tokens: Some(tokens),
            max: 32,
        } => assert!(tokens > 200, "{tokens}"),
        other => panic!("the second text must be refused as too long: {other:?}"),
    }
    // Megabytes are not tokenised to say so: their length is "more than 32".
    let request = Request::Embed {
        texts: vec!["x".repeat(10 << 20)],
        role: Role::Document,
        options: strict,
        caller: Default::default(),
    };
    match c.call(&request).unwrap() {
        Response::TooLong {
            index: 0,
            tokens: None,
            max: 32,
        } => {}
        other => panic!("a 10 MB text must be refused as more than 32 tokens: {other:?}"),
    }
    assert_eq!(c.status().forward_passes, passes);

    // Too many texts in one request: refused before any work.
    let passes = c.status().forward_passes;
    let (kind, message) = c
        .embed(texts(proto::MAX_REQUEST_TEXTS + 1), EmbedOptions::default())
        .unwrap_err();
    assert_eq!(kind, proto::ErrorKind::InvalidInput, "{message}");
    assert!(message.contains("split it"), "{message}");
    assert_eq!(c.status().forward_passes, passes);

    // A layer selection over more texts than allowed: refused before any work.
    let request = Request::SelectLayers {
        texts: texts(41),
        options: SelectOptions::default(),
        caller: Default::default(),
    };
    match c.call(&request).unwrap() {
        Response::Error { kind, message } => {
            assert_eq!(kind, proto::ErrorKind::InvalidInput, "{message}");
            assert!(message.contains("max_calibration_texts = 40"), "{message}");
        }
        other => panic!("a 41-text selection was accepted: {other:?}"),
    }
    assert_eq!(c.status().forward_passes, passes);
}

#[test]
fn garbage_on_the_socket_is_refused_and_the_server_serves_on() {
    use std::io::{Read, Write};
    let server = Server::start("garbage", &[]);
    let mut c = server.connect();
    let served = c.status().requests_served;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut refused = 0;
    for case in 0..200 {
        let mut s = UnixStream::connect(&server.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let len = (next() % 300) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let sent = match case % 3 {
            // A frame of random bytes: not JSON, or not a request.
            0 => proto::write_frame(&mut s, &bytes),
            // A length over the limit.
            1 => s.write_all(&(proto::MAX_FRAME as u32 + 1 + (next() as u32 >> 8)).to_le_bytes()),
            // A valid request with a byte flipped.
            _ => {
                let mut frame = Vec::new();
                proto::write_json(
                    &mut frame,
                    &Request::Embed {
                        texts: vec!["x".into()],
                        role: Role::Query,
                        options: EmbedOptions::default(),
                        caller: Default::default(),
                    },
                )
                .unwrap();
                let at = 4 + (next() as usize) % (frame.len() - 4);
                frame[at] ^= 0x5a;
                s.write_all(&frame)
            }
        };
        sent.unwrap();
        // Either an answer (an error, or an embedding when the flip kept it
        // valid) or a closed connection; never a hang or a dead server.
        let mut reply = Vec::new();
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.read_to_end(&mut reply)
            .expect("the server answers or closes, within 10 s");
        if let Ok(Response::Error {
            kind: proto::ErrorKind::Protocol,
            ..
        }) = proto::read_json::<_, Response>(&mut &reply[..])
        {
            refused += 1;
        }
    }
    assert!(
        refused > 50,
        "only {refused} of 200 garbage requests got a protocol error"
    );
    // The same process serves on.
    let mut after = server.connect();
    let status = after.status();
    assert_eq!(status.state, proto::EngineState::Ready);
    assert!(status.requests_served >= served);
    after
        .embed(vec!["still serving".into()], EmbedOptions::default())
        .unwrap();
}

#[test]
fn requests_name_the_model_they_were_prepared_for() {
    let server = Server::start("model-id", &["--max-calibration-texts", "64"]);
    let mut c = server.connect();
    let status = c.status();
    assert!(!status.first().model_id.is_empty());
    // Prepared for another model (the engine restarted with a new one since
    // the session looked up its calibration): refused, nothing runs.
    let passes = status.forward_passes;
    let stale = EmbedOptions {
        expect_model: Some("llama:/elsewhere/other.gguf:30x576:1".into()),
        ..Default::default()
    };
    let (kind, message) = c.embed(vec!["x".into()], stale).unwrap_err();
    assert_eq!(kind, proto::ErrorKind::ModelChanged, "{message}");
    assert!(message.contains(&status.first().model_id), "{message}");
    assert_eq!(c.status().forward_passes, passes);
    // Prepared for this one: served.
    let current = EmbedOptions {
        expect_model: Some(status.first().model_id.clone()),
        ..Default::default()
    };
    c.embed(vec!["x".into()], current).unwrap();
    // A layer selection names the model it ran on.
    let request = Request::SelectLayers {
        texts: texts(16),
        options: SelectOptions::default(),
        caller: Default::default(),
    };
    proto::write_json(&mut c.0, &request).unwrap();
    loop {
        match proto::read_json::<_, Response>(&mut c.0).unwrap() {
            Response::Progress { .. } => continue,
            Response::Layers { model_id, .. } => {
                assert_eq!(model_id, status.first().model_id);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_large_request_does_not_hold_the_engine_for_the_others() {
    let server = Server::start("fair", &["--batch-tokens", "256"]);
    let mut watcher = server.connect();
    let before = watcher.status().forward_passes;
    let big = texts(400);
    let mut a = server.connect();
    proto::write_json(
        &mut a.0,
        &Request::Embed {
            texts: big.clone(),
            role: Role::Document,
            options: EmbedOptions::default(),
            caller: Default::default(),
        },
    )
    .unwrap();
    let started = Instant::now();
    while watcher.status().forward_passes < before + 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the request never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another session's text comes in while the large request runs: it
    // waits for the slice running (a batch budget), not for the request.
    let mut b = server.connect();
    let asked_at = watcher.status().forward_passes;
    b.embed(
        vec!["a short question from another session".into()],
        EmbedOptions::default(),
    )
    .unwrap();
    let waited = watcher.status().forward_passes - asked_at;
    assert!(
        waited <= 4,
        "the other session waited {waited} forward passes"
    );
    // The large request completes, each text with the vector it has alone.
    let (vectors, truncated) = match proto::read_json::<_, Response>(&mut a.0).unwrap() {
        Response::Embeddings {
            count,
            dim,
            truncated,
            ..
        } => {
            let values = proto::read_f32s_exact(&mut a.0, count * dim).unwrap();
            (
                values.chunks(dim).map(<[f32]>::to_vec).collect::<Vec<_>>(),
                truncated,
            )
        }
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(vectors.len(), big.len());
    assert!(truncated.is_empty());
    let total = watcher.status().forward_passes - before;
    assert!(
        total > 20,
        "the request ran in only {total} passes: not sliced as the test assumes"
    );
    for i in [0, 199, 399] {
        let (alone, _) = b
            .embed(vec![big[i].clone()], EmbedOptions::default())
            .unwrap();
        let diff = alone[0]
            .iter()
            .zip(&vectors[i])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-6,
            "text {i} differs by {diff} from its vector alone"
        );
    }
}

/// Fault injection is a test-only path: a server started without
/// `--allow-faults` refuses to arm a fault and serves on unharmed; one
/// started with it arms the fault and the next batch carries it out.
#[test]
fn faults_are_armed_only_where_the_server_allows_them() {
    let plain = Server::start("faults-off", &[]);
    let mut c = plain.connect();
    match c
        .call(&Request::Fault {
            fault: proto::Fault::Panic,
        })
        .unwrap()
    {
        Response::Error { kind, message } => {
            assert_eq!(kind, proto::ErrorKind::InvalidInput);
            assert!(
                message.contains("--allow-faults") && message.contains("kvembed.debug_faults"),
                "{message}"
            );
        }
        other => panic!("a fault was armed without --allow-faults: {other:?}"),
    }
    // Nothing was armed: the next batch succeeds.
    assert_eq!(
        c.embed(texts(2), EmbedOptions::default()).unwrap().0.len(),
        2
    );

    let testing = Server::start("faults-on", &["--allow-faults"]);
    let mut c = testing.connect();
    match c
        .call(&Request::Fault {
            fault: proto::Fault::Panic,
        })
        .unwrap()
    {
        Response::FaultArmed { .. } => {}
        other => panic!("with --allow-faults the fault must be armed: {other:?}"),
    }
    let (kind, message) = c.embed(texts(2), EmbedOptions::default()).unwrap_err();
    assert_eq!(kind, proto::ErrorKind::Internal);
    assert!(message.contains("injected fault"), "{message}");
    // The panic failed that batch only.
    assert_eq!(
        c.embed(texts(2), EmbedOptions::default()).unwrap().0.len(),
        2
    );
}

/// `Describe` answers what a request with given options runs on the loaded
/// model: each method's own layers, bias and prompts, the options' where
/// they set them, nothing re-routed for a method without re-routing.
#[test]
fn describe_says_what_a_request_runs() {
    let server = Server::start("describe", &[]);
    let mut c = server.connect();
    let status = c.status();
    let mut describe = |options: EmbedOptions| match c.call(&Request::Describe { options }).unwrap()
    {
        Response::Described(info) => info,
        other => panic!("unexpected {other:?}"),
    };
    let kv = describe(EmbedOptions::default());
    assert_eq!(kv.method, status.first().default_method);
    assert_eq!(kv.layers, status.first().default_layers);
    assert_eq!(kv.bias, Some(status.first().default_bias));
    assert_eq!(kv.document_prompt, status.first().document_prompt);
    let paper = describe(EmbedOptions {
        method: Some("kv-paper".into()),
        ..Default::default()
    });
    assert_eq!(paper.method, "kv-paper");
    assert_eq!(paper.layers.len(), 3);
    assert_ne!(
        paper.layers, kv.layers,
        "kv-paper re-routes at its own window"
    );
    assert_ne!(paper.document_prompt, kv.document_prompt);
    let mean = describe(EmbedOptions {
        method: Some("mean".into()),
        ..Default::default()
    });
    assert!(mean.layers.is_empty() && mean.bias.is_none(), "{mean:?}");
    let set = describe(EmbedOptions {
        method: Some("kv-paper".into()),
        layers: Some(vec![2, 3]),
        bias: Some(2.5),
        ..Default::default()
    });
    assert_eq!((set.layers, set.bias), (vec![2, 3], Some(2.5)));
    match c
        .call(&Request::Describe {
            options: EmbedOptions {
                method: Some("nope".into()),
                ..Default::default()
            },
        })
        .unwrap()
    {
        Response::Error { kind, .. } => assert_eq!(kind, proto::ErrorKind::InvalidInput),
        other => panic!("an unknown method must be refused: {other:?}"),
    }
}

/// `kvembed embed --threads N hello` with its address space limited to
/// `limit` bytes, as `kvembed.engine_memory_limit` limits the engine.
fn embed_under_limit(limit: u64, threads: usize) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvembed"));
    cmd.args([
        "embed",
        "--model",
        &model(),
        "--threads",
        &threads.to_string(),
        "hello",
    ]);
    // SAFETY: setrlimit is async-signal-safe and changes only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run kvembed embed")
}

/// Compute threads that cannot start under the engine's memory limit are a
/// load error that says so; rayon panicked ("The global thread pool has not
/// been initialized") or the process aborted.
#[test]
fn threads_that_do_not_fit_the_memory_limit_are_a_clear_error() {
    // 2,048 stacks of 2 MiB do not fit in 1 GiB; the model does.
    let out = embed_under_limit(1 << 30, 2048);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not start 2048 compute threads")
            && stderr.contains("memory limit")
            && stderr.contains("kvembed.threads"),
        "{stderr}"
    );
    // With the threads it can have, the same model embeds under that limit.
    let out = embed_under_limit(1 << 30, 2);
    assert!(
        out.status.success() && out.stdout.starts_with(b"[["),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

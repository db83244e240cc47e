//! Every metric the server exports, in one place, names with unit suffixes. Labels carry routes,
//! statuses and outcomes only: never a question, a passage or anything about a patient.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub http_requests_total: IntCounterVec,
    pub http_request_duration_seconds: HistogramVec,
    pub answers_total: IntCounterVec,
    pub answer_first_token_seconds: Histogram,
    pub answer_duration_seconds: Histogram,
    pub prompt_tokens_total: IntCounter,
    pub generated_tokens_total: IntCounter,
    pub generations_finished_total: IntCounter,
    pub generations_cancelled_total: IntCounter,
    pub citations_total: IntCounter,
    pub citations_dropped_total: IntCounter,
    pub embedded_texts_total: IntCounter,
    pub ready: IntGauge,
    pub generations_waiting: IntGauge,
    pub kv_cache_blocks: IntGauge,
    pub kv_cache_blocks_used: IntGauge,
    pub kv_cache_blocks_cached: IntGauge,
    pub prefix_cache_lookups_total: IntCounter,
    pub prefix_cache_hits_total: IntCounter,
    pub prompt_tokens_cached_total: IntCounter,
    pub preemptions_total: IntCounter,
    pub decode_graph_replays_total: IntCounter,
    pub decode_graphs: IntGauge,
    pub corpus_documents: IntGauge,
    pub corpus_chunks: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // Every metric is defined here once; a bad definition or a duplicate name is a bug.
        fn add<C: Collector + Clone + 'static>(registry: &Registry, c: prometheus::Result<C>) -> C {
            let c = c.expect("metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        }
        let buckets = |opts: HistogramOpts| opts.buckets(LATENCY_BUCKETS.to_vec());
        let counter = |name: &str, help: &str| add(&registry, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| add(&registry, IntGauge::new(name, help));
        let histogram = |name: &str, help: &str| {
            add(
                &registry,
                Histogram::with_opts(buckets(HistogramOpts::new(name, help))),
            )
        };
        let http_requests_total = add(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cited_http_requests_total",
                    "HTTP requests by route and status",
                ),
                &["route", "status"],
            ),
        );
        let http_request_duration_seconds = add(
            &registry,
            HistogramVec::new(
                buckets(HistogramOpts::new(
                    "cited_http_request_duration_seconds",
                    "Time to the response head (streams continue after it), by route",
                )),
                &["route"],
            ),
        );
        let answers_total = add(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cited_answers_total",
                    "Answers by outcome: stop, length, abstained, cancelled, error",
                ),
                &["outcome"],
            ),
        );
        Self {
            http_requests_total,
            http_request_duration_seconds,
            answers_total,
            answer_first_token_seconds: histogram(
                "cited_answer_first_token_seconds",
                "From the request to the first generated text",
            ),
            answer_duration_seconds: histogram(
                "cited_answer_duration_seconds",
                "From the request to the end of the answer",
            ),
            prompt_tokens_total: counter("cited_prompt_tokens_total", "Prompt tokens processed"),
            generated_tokens_total: counter("cited_generated_tokens_total", "Tokens generated"),
            generations_finished_total: counter(
                "cited_generations_finished_total",
                "Generations that ran to their end (stop token or max_tokens)",
            ),
            generations_cancelled_total: counter(
                "cited_generations_cancelled_total",
                "Generations stopped because the client went away",
            ),
            citations_total: counter("cited_citations_total", "Citation events sent"),
            citations_dropped_total: counter(
                "cited_citations_dropped_total",
                "Marker numbers naming no provided passage, removed",
            ),
            embedded_texts_total: counter(
                "cited_embedded_texts_total",
                "Texts embedded (questions, queries and /v1/embeddings inputs)",
            ),
            ready: gauge("cited_ready", "1 once models and store are loaded"),
            generations_waiting: gauge(
                "cited_generations_waiting",
                "Answers queued for a generation slot",
            ),
            kv_cache_blocks: gauge("cited_kv_cache_blocks", "Blocks of the paged KV cache"),
            kv_cache_blocks_used: gauge(
                "cited_kv_cache_blocks_used",
                "KV cache blocks held by running sequences",
            ),
            kv_cache_blocks_cached: gauge(
                "cited_kv_cache_blocks_cached",
                "Free KV cache blocks still holding a reusable prompt prefix",
            ),
            prefix_cache_lookups_total: counter(
                "cited_prefix_cache_lookups_total",
                "Full prompt blocks looked up in the prefix cache",
            ),
            prefix_cache_hits_total: counter(
                "cited_prefix_cache_hits_total",
                "Full prompt blocks found in the prefix cache (hit rate = hits / lookups)",
            ),
            prompt_tokens_cached_total: counter(
                "cited_prompt_tokens_cached_total",
                "Prompt tokens whose forward pass the prefix cache saved",
            ),
            preemptions_total: counter(
                "cited_preemptions_total",
                "Sequences preempted (blocks freed, history recomputed later) for lack of KV blocks",
            ),
            decode_graph_replays_total: counter(
                "cited_decode_graph_replays_total",
                "Decode steps replayed from a CUDA graph (--cuda-graphs)",
            ),
            decode_graphs: gauge(
                "cited_decode_graphs",
                "CUDA graphs recorded for decode steps, one per batch shape met (--cuda-graphs)",
            ),
            corpus_documents: gauge("cited_corpus_documents", "Documents in the store"),
            corpus_chunks: gauge("cited_corpus_chunks", "Chunks in the store"),
            registry,
        }
    }

    /// Brings the engine's running totals into the exported counters.
    pub fn sync_engine(&self, stats: &crate::engine::worker::EngineStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let sync = |c: &IntCounter, v: u64| {
            let cur = c.get();
            if v > cur {
                c.inc_by(v - cur);
            }
        };
        sync(&self.prompt_tokens_total, stats.prompt_tokens.load(Relaxed));
        sync(
            &self.generated_tokens_total,
            stats.generated_tokens.load(Relaxed),
        );
        sync(
            &self.generations_finished_total,
            stats.generations_finished.load(Relaxed),
        );
        sync(
            &self.generations_cancelled_total,
            stats.generations_cancelled.load(Relaxed),
        );
        sync(
            &self.embedded_texts_total,
            stats.embedded_texts.load(Relaxed),
        );
        sync(
            &self.prefix_cache_lookups_total,
            stats.prefix_blocks_looked_up.load(Relaxed),
        );
        sync(
            &self.prefix_cache_hits_total,
            stats.prefix_blocks_hit.load(Relaxed),
        );
        sync(
            &self.prompt_tokens_cached_total,
            stats.cached_prompt_tokens.load(Relaxed),
        );
        sync(&self.preemptions_total, stats.preemptions.load(Relaxed));
        sync(
            &self.decode_graph_replays_total,
            stats.graph_replays.load(Relaxed),
        );
        self.decode_graphs
            .set(stats.graphs_recorded.load(Relaxed) as i64);
        self.generations_waiting
            .set(stats.waiting.load(Relaxed) as i64);
        self.kv_cache_blocks
            .set(stats.kv_blocks_total.load(Relaxed) as i64);
        self.kv_cache_blocks_used
            .set(stats.kv_blocks_used.load(Relaxed) as i64);
        self.kv_cache_blocks_cached
            .set(stats.kv_blocks_cached.load(Relaxed) as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding metrics to memory");
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

//! Embedding methods: prompt templates, pooling, re-routing windows and the
//! training-free baselines, all on the same backbone and selectable by name.

use kvembed_model::arch::Family;
use kvembed_model::decoder::PrefixPosition;
use kvembed_model::error::{EngineError, Result};
use kvembed_proto::EmbedOptions;

/// The compression prompt of KV-Embedding.
pub const COMPRESS_DOC: &str = "Context: {text}\nCompress the Context in one word:";
pub const COMPRESS_QUERY: &str = "Query: {text}\nCompress the Query in one word:";
/// PromptEOL (Jiang et al., 2023).
pub const PROMPTEOL: &str = "This sentence : \"{text}\" means in one word:\"";
/// The query side of PromptEOL for asymmetric search (not on Gemma 3:
/// [`Method::for_family`]).
pub const PROMPTEOL_QUERY: &str = "This search query : \"{text}\" means in one word:\"";
/// Echo embeddings (Springer et al., 2024): the text twice, pool the second copy.
pub const ECHO: &str = "Rewrite the sentence: {text}\nRewritten sentence: {text}";
pub const RAW: &str = "{text}";
/// PromptEOL's "pretended chain of thought" variant (Zhang et al., 2024).
pub const PCOT: &str =
    "After thinking step by step , this sentence : \"{text}\" means in one word:\"";
pub const PCOT_QUERY: &str =
    "After thinking step by step , this search query : \"{text}\" means in one word:\"";
/// PromptEOL's "knowledge enhancement" variant (Zhang et al., 2024).
pub const KE: &str =
    "The essence of a sentence is often captured by its main subjects and actions, \
     while descriptive terms provide additional but less central details. With this in mind , \
     this sentence : \"{text}\" means in one word:\"";
pub const KE_QUERY: &str = "The essence of a sentence is often captured by its main subjects and \
     actions, while descriptive terms provide additional but less central details. With this in \
     mind , this search query : \"{text}\" means in one word:\"";
/// Between the templates of a prompt ensemble ([`PromptSet`]).
pub const PROMPT_SEPARATOR: &str = "{+}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over all real tokens (BOS excluded).
    Mean,
    /// The final token's state.
    Last,
    /// Average of `Mean` and `Last` (the method's default).
    Hybrid,
    /// Mean over the tokens of the *last* copy of the text (Echo).
    LastCopyMean,
    /// The first token's state (an encoder's `[CLS]`).
    First,
}

impl Pooling {
    pub fn parse(s: &str) -> Result<Pooling> {
        Ok(match s {
            "mean" => Pooling::Mean,
            "last" => Pooling::Last,
            "hybrid" => Pooling::Hybrid,
            "echo" | "last-copy-mean" => Pooling::LastCopyMean,
            "first" | "cls" => Pooling::First,
            other => {
                return Err(EngineError::invalid(
                    "pooling",
                    format!("'{other}' (mean, last, hybrid, echo, first)"),
                ))
            }
        })
    }
}

/// A prompt template: literal pieces around one or more `{text}` slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub pieces: Vec<String>,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template> {
        let pieces: Vec<String> = s.split("{text}").map(str::to_string).collect();
        if pieces.len() < 2 {
            return Err(EngineError::invalid(
                "prompt template",
                format!("'{s}' has no {{text}} placeholder"),
            ));
        }
        Ok(Template { pieces })
    }

    pub fn slots(&self) -> usize {
        self.pieces.len() - 1
    }

    pub fn render(&self, text: &str) -> String {
        self.pieces.join(text)
    }

    pub fn source(&self) -> String {
        self.pieces.join("{text}")
    }
}

/// The prompt of one role: one template, or several (a prompt ensemble,
/// written with [`PROMPT_SEPARATOR`] between them). Under an ensemble a
/// text is embedded once per template and its embedding is the normalized
/// mean of the unit vectors: one vector of the model's width, whose cosines
/// rank like the mean of the cosines under each template.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSet {
    templates: Vec<Template>,
}

impl PromptSet {
    pub fn parse(s: &str) -> Result<PromptSet> {
        let templates = s
            .split(PROMPT_SEPARATOR)
            .map(Template::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(PromptSet { templates })
    }

    pub fn single(t: Template) -> PromptSet {
        PromptSet { templates: vec![t] }
    }

    /// The templates, the first first (never empty).
    pub fn templates(&self) -> &[Template] {
        &self.templates
    }

    /// The first template: the one a single-prompt method runs.
    pub fn first(&self) -> &Template {
        &self.templates[0]
    }

    /// The prompt as written: the templates joined by [`PROMPT_SEPARATOR`].
    pub fn source(&self) -> String {
        self.templates
            .iter()
            .map(Template::source)
            .collect::<Vec<_>>()
            .join(PROMPT_SEPARATOR)
    }
}

/// Which layers re-route, before the model's depth is known.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerChoice {
    Fixed(Vec<usize>),
    /// A window of `width` layers starting at `start` × depth.
    Relative {
        start: f32,
        width: usize,
    },
    /// The default method's window for the model's family
    /// ([`kv_window_start`]).
    KvDefault {
        width: usize,
    },
}

impl LayerChoice {
    pub fn resolve(&self, n_layers: usize, family: Family) -> Vec<usize> {
        match self {
            LayerChoice::Fixed(v) => v.clone(),
            LayerChoice::KvDefault { width } => LayerChoice::Relative {
                start: kv_window_start(family),
                width: *width,
            }
            .resolve(n_layers, family),
            LayerChoice::Relative { start, width } => {
                let width = (*width).clamp(1, n_layers);
                let first = ((*start * n_layers as f32).round() as usize).min(n_layers - width);
                (first..first + width).collect()
            }
        }
    }

    /// Parse `auto`, `6,7,8` or `6-8`.
    pub fn parse_list(s: &str) -> Result<Option<Vec<usize>>> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("auto") {
            return Ok(None);
        }
        kvembed_proto::parse_layer_list(s)
            .map(Some)
            .map_err(|e| EngineError::invalid("layers", format!("'{s}': {e} (or 'auto')")))
    }
}

#[derive(Debug, Clone)]
pub struct RerouteConfig {
    pub layers: LayerChoice,
    pub bias: f32,
    pub prefix: PrefixPosition,
}

#[derive(Debug, Clone)]
pub struct Method {
    pub name: String,
    pub document: PromptSet,
    pub query: PromptSet,
    pub pooling: Pooling,
    pub reroute: Option<RerouteConfig>,
    pub prepend: Option<Prepend>,
    /// Wrap each input in the special tokens the model's own tokenizer adds
    /// (`TextTokenizer::specials`) instead of BOS alone, and pool over all
    /// of them: the `native` method ([`crate::native`]).
    pub specials: bool,
}

/// Token Prepending (Fu et al., 2024): a placeholder token whose state is
/// overwritten by the last token's from layer 1 to `fraction` of the depth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prepend {
    pub fraction: f32,
    /// The placeholder's position in the token sequence. `None`: the paper's
    /// place, right after BOS; first where the model adds no BOS.
    pub position: Option<usize>,
}

/// The product default: what re-routing needs to pay off on small backbones
/// (see docs/QUALITY.md for the study behind it).
pub const DEFAULT_METHOD: &str = "kv";

/// Where the default method's re-routing window starts, as a fraction of the
/// depth: two thirds (layers 20-22 of SmolLM2's 30), half on Qwen2 (12-14 of
/// Qwen2.5-0.5B's 24), a third on Gemma 3 (6-8 of Gemma-3-270M's 18), from
/// the sweeps in docs/QUALITY.md (one backbone per family; the families
/// without one keep two thirds). Layer selection falls back to the same
/// window when TwoNN finds no usable minimum.
pub fn kv_window_start(family: Family) -> f32 {
    match family {
        Family::Qwen2 => 0.5,
        Family::Gemma3 => 0.33,
        Family::Llama | Family::Mistral | Family::Qwen3 => 0.67,
    }
}

/// Token Prepending's layers: the first quarter of the depth (from layer 1).
const TOKEN_PREPENDING: Prepend = Prepend {
    fraction: 0.25,
    position: None,
};

pub const METHOD_NAMES: &[&str] = &[
    "kv",
    "kv-no-reroute",
    "kv-paper",
    "kv-paper-no-reroute",
    "kv-compress",
    "kv-compress-no-reroute",
    "kv-last",
    "kv-echo",
    "kv-tp",
    "mean",
    "last",
    "prompteol",
    "echo",
    "token-prepending",
    "kv-ensemble",
    "prompteol-ensemble",
];

impl Method {
    pub fn from_name(name: &str) -> Result<Method> {
        let t = |s: &str| PromptSet::parse(s).expect("built-in template");
        let m = |name: &str, doc: &str, query: &str, pooling, reroute, prepend| Method {
            name: name.to_string(),
            document: t(doc),
            query: t(query),
            pooling,
            reroute,
            prepend,
            specials: false,
        };
        // The product default, from the study in docs/QUALITY.md: on small
        // backbones the PromptEOL prompt with last-token pooling is far
        // stronger than the compression prompt, and re-routing pays on it
        // with b = 1 at two thirds of the depth (layers 20-22 of SmolLM2's
        // 30: ahead of PromptEOL on every STS group at full size; 18-20 ties
        // on STS but loses 4.8 nDCG@10 on SciFact; 40 % depth and below cost
        // a little), at half the depth on Qwen2 (12-14 of 24: ahead of
        // every baseline on STS and SciFact, where 16-18 trails Token
        // Prepending on STS) and at a third on Gemma 3 (6-8 of 18: ahead of
        // PromptEOL on STS and SciFact, where 12-14 trails it on both).
        let kv_reroute = Some(RerouteConfig {
            layers: LayerChoice::KvDefault { width: 3 },
            bias: 1.0,
            prefix: PrefixPosition::Last,
        });
        // With the compression prompt, early layers and b = 2 were best.
        let compress_reroute = Some(RerouteConfig {
            layers: LayerChoice::Relative {
                start: 0.2,
                width: 3,
            },
            bias: 2.0,
            prefix: PrefixPosition::Last,
        });
        let paper_reroute = Some(RerouteConfig {
            // Uncalibrated fallback: the late window TwoNN picks on SmolLM2
            // (layers 27-29 of 30). `select-layers` gives the real choice.
            layers: LayerChoice::Relative {
                start: 0.9,
                width: 3,
            },
            bias: 1.0,
            prefix: PrefixPosition::Last,
        });
        Ok(match name {
            "kv" => m(
                "kv",
                PROMPTEOL,
                PROMPTEOL_QUERY,
                Pooling::Last,
                kv_reroute,
                None,
            ),
            "kv-no-reroute" => m(
                "kv-no-reroute",
                PROMPTEOL,
                PROMPTEOL_QUERY,
                Pooling::Last,
                None,
                None,
            ),
            "kv-paper" => m(
                "kv-paper",
                COMPRESS_DOC,
                COMPRESS_QUERY,
                Pooling::Hybrid,
                paper_reroute,
                None,
            ),
            "kv-paper-no-reroute" => m(
                "kv-paper-no-reroute",
                COMPRESS_DOC,
                COMPRESS_QUERY,
                Pooling::Hybrid,
                None,
                None,
            ),
            "kv-compress" => m(
                "kv-compress",
                COMPRESS_DOC,
                COMPRESS_QUERY,
                Pooling::Hybrid,
                compress_reroute,
                None,
            ),
            "kv-compress-no-reroute" => m(
                "kv-compress-no-reroute",
                COMPRESS_DOC,
                COMPRESS_QUERY,
                Pooling::Hybrid,
                None,
                None,
            ),
            // Variants of the study: last-token pooling with the compression
            // prompt, and re-routing inside Echo.
            "kv-last" => m(
                "kv-last",
                COMPRESS_DOC,
                COMPRESS_QUERY,
                Pooling::Last,
                compress_reroute,
                None,
            ),
            "kv-echo" => m(
                "kv-echo",
                ECHO,
                ECHO,
                Pooling::LastCopyMean,
                kv_reroute,
                None,
            ),
            // Token Prepending in the early layers and re-routing at the
            // default window: the two ways of letting early tokens see the
            // whole text, in one pass.
            "kv-tp" => m(
                "kv-tp",
                PROMPTEOL,
                PROMPTEOL_QUERY,
                Pooling::Last,
                kv_reroute,
                Some(TOKEN_PREPENDING),
            ),
            "mean" => m("mean", RAW, RAW, Pooling::Mean, None, None),
            "last" => m("last", RAW, RAW, Pooling::Last, None, None),
            "prompteol" => m("prompteol", PROMPTEOL, PROMPTEOL, Pooling::Last, None, None),
            "echo" => m("echo", ECHO, ECHO, Pooling::LastCopyMean, None, None),
            "token-prepending" => m(
                "token-prepending",
                PROMPTEOL,
                PROMPTEOL,
                Pooling::Last,
                None,
                Some(TOKEN_PREPENDING),
            ),
            // Prompt ensembles: PromptEOL and its two variants, one forward
            // pass each, with and without the default's re-routing.
            "kv-ensemble" => m(
                "kv-ensemble",
                &[PROMPTEOL, PCOT, KE].join(PROMPT_SEPARATOR),
                &[PROMPTEOL_QUERY, PCOT_QUERY, KE_QUERY].join(PROMPT_SEPARATOR),
                Pooling::Last,
                kv_reroute,
                None,
            ),
            "prompteol-ensemble" => {
                let all = [PROMPTEOL, PCOT, KE].join(PROMPT_SEPARATOR);
                m("prompteol-ensemble", &all, &all, Pooling::Last, None, None)
            }
            other => {
                return Err(EngineError::invalid(
                    "method",
                    format!(
                        "'{other}' (known: {}, and native: the model's own embedding)",
                        METHOD_NAMES.join(", ")
                    ),
                ))
            }
        })
    }

    /// The prompt of `role`.
    pub fn prompts(&self, role: kvembed_proto::Role) -> &PromptSet {
        match role {
            kvembed_proto::Role::Document => &self.document,
            kvembed_proto::Role::Query => &self.query,
        }
    }

    /// The method as it runs on a backbone of `family`, before a request's
    /// overrides ([`Method::with_options`]): on Gemma 3 the query side of
    /// `kv` and its variants is their document prompt instead of the
    /// search-query wording, which helps retrieval on SmolLM2 and Qwen2
    /// (+2.1 and +4.3 nDCG@10 on SciFact) and cost Gemma-3-270M 5.7
    /// (docs/QUALITY.md, "The query prompt per family"). A query prompt a
    /// request or setting names is kept as given.
    pub fn for_family(mut self, family: Family) -> Method {
        let search_query = [
            PROMPTEOL_QUERY.to_string(),
            [PROMPTEOL_QUERY, PCOT_QUERY, KE_QUERY].join(PROMPT_SEPARATOR),
        ];
        if family == Family::Gemma3 && search_query.contains(&self.query.source()) {
            self.query = self.document.clone();
        }
        self
    }

    /// Apply per-request overrides (layers, bias, prompts).
    pub fn with_options(mut self, o: &EmbedOptions) -> Result<Method> {
        if let Some(p) = &o.document_prompt {
            self.document = PromptSet::parse(p)?;
        }
        if let Some(p) = &o.query_prompt {
            self.query = PromptSet::parse(p)?;
        }
        if let Some(b) = o.bias {
            if !b.is_finite() {
                return Err(EngineError::invalid(
                    "bias",
                    format!("{b} is not a finite number"),
                ));
            }
            if let Some(r) = &mut self.reroute {
                r.bias = b;
            }
        }
        if let Some(layers) = &o.layers {
            if let Some(r) = &mut self.reroute {
                r.layers = LayerChoice::Fixed(layers.clone());
            }
        }
        Ok(self)
    }

    /// Applies the study's overrides ([`Knobs`]) on top of the method.
    pub fn with_knobs(mut self, k: &Knobs) -> Result<Method> {
        if let Some(p) = &k.pooling {
            self.pooling = Pooling::parse(p)?;
        }
        if let Some(p) = &k.prefix_position {
            let pos = match p.as_str() {
                "last" => PrefixPosition::Last,
                "zero" => PrefixPosition::Zero,
                other => {
                    return Err(EngineError::invalid(
                        "prefix_position",
                        format!("'{other}' (last, zero)"),
                    ))
                }
            };
            if let Some(r) = &mut self.reroute {
                r.prefix = pos;
            }
        }
        if let Some(pos) = k.placeholder_position {
            if pos > 1 {
                return Err(EngineError::invalid(
                    "placeholder_position",
                    format!("{pos} (0 or 1)"),
                ));
            }
            if let Some(p) = &mut self.prepend {
                p.position = Some(pos);
            }
        }
        Ok(self)
    }
}

/// The study's overrides of a method (kvembed-lab's flags). They are not
/// part of the wire protocol: the product serves the methods as defined.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Knobs {
    /// Pooling override: `mean`, `last`, `hybrid` or `echo`.
    pub pooling: Option<String>,
    /// Where the re-routed key sits in rotary space: `last` (its own
    /// position, the method as written) or `zero`.
    pub prefix_position: Option<String>,
    /// Token Prepending's placeholder position (0 or 1). `None`: right after
    /// BOS where the model adds one, else first.
    pub placeholder_position: Option<usize>,
    /// The representation TwoNN measures per layer: `last` (default) or `mean`.
    pub id_representation: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = Template::parse(ECHO).unwrap();
        assert_eq!(t.slots(), 2);
        assert_eq!(
            t.render("x"),
            "Rewrite the sentence: x\nRewritten sentence: x"
        );
        assert!(Template::parse("no slot").is_err());
    }

    #[test]
    fn relative_windows_fit_the_model() {
        let f = Family::Llama;
        let w = LayerChoice::Relative {
            start: 0.9,
            width: 3,
        };
        assert_eq!(w.resolve(30, f), vec![27, 28, 29]);
        assert_eq!(w.resolve(4, f), vec![1, 2, 3]);
        assert_eq!(
            w.resolve(30, Family::Qwen2),
            vec![27, 28, 29],
            "a relative window ignores the family"
        );
        assert_eq!(
            LayerChoice::Relative {
                start: 0.2,
                width: 3
            }
            .resolve(30, f),
            vec![6, 7, 8]
        );
        assert_eq!(
            LayerChoice::Relative {
                start: 0.4,
                width: 3
            }
            .resolve(30, f),
            vec![12, 13, 14]
        );
        // The default `kv` window on the test backbones (SmolLM2 30 layers,
        // Qwen2.5-0.5B 24, Qwen2.5-1.5B 28, Gemma-3-270M 18).
        let kv = Method::from_name("kv").unwrap().reroute.unwrap().layers;
        assert_eq!(kv.resolve(30, Family::Llama), vec![20, 21, 22]);
        assert_eq!(kv.resolve(24, Family::Qwen2), vec![12, 13, 14]);
        assert_eq!(kv.resolve(28, Family::Qwen2), vec![14, 15, 16]);
        assert_eq!(kv.resolve(18, Family::Gemma3), vec![6, 7, 8]);
        assert_eq!(kv.resolve(32, Family::Mistral), vec![21, 22, 23]);
        assert_eq!(
            kv.resolve(2, Family::Qwen2),
            vec![0, 1],
            "a window wider than the model is cut to it"
        );
    }

    #[test]
    fn gemma3_queries_take_the_document_prompt() {
        let doc = PromptSet::parse(PROMPTEOL).unwrap();
        let search = PromptSet::parse(PROMPTEOL_QUERY).unwrap();
        for name in ["kv", "kv-no-reroute", "kv-tp"] {
            let m = Method::from_name(name).unwrap();
            assert_eq!(m.query, search, "{name}");
            for f in [Family::Llama, Family::Qwen2, Family::Mistral, Family::Qwen3] {
                assert_eq!(m.clone().for_family(f).query, search, "{name} {f:?}");
            }
            let g = m.for_family(Family::Gemma3);
            assert_eq!(g.query, doc, "{name} on Gemma 3");
            assert_eq!(g.document, doc);
        }
        let ens = Method::from_name("kv-ensemble").unwrap();
        assert_ne!(ens.query, ens.document);
        let g = ens.for_family(Family::Gemma3);
        assert_eq!(g.query, g.document);
        assert_eq!(g.query.templates.len(), 3);
        // Methods without the search-query wording are left alone.
        for name in ["kv-paper", "kv-compress", "prompteol", "echo", "mean"] {
            let m = Method::from_name(name).unwrap();
            let g = m.clone().for_family(Family::Gemma3);
            assert_eq!((g.document, g.query), (m.document, m.query), "{name}");
        }
        // A query prompt a request names is kept, the search wording too.
        let o = EmbedOptions {
            query_prompt: Some(PROMPTEOL_QUERY.into()),
            ..Default::default()
        };
        let m = Method::from_name("kv")
            .unwrap()
            .for_family(Family::Gemma3)
            .with_options(&o)
            .unwrap();
        assert_eq!(m.query, search);
    }

    #[test]
    fn layer_lists_parse() {
        assert_eq!(LayerChoice::parse_list("auto").unwrap(), None);
        assert_eq!(LayerChoice::parse_list("6-8").unwrap(), Some(vec![6, 7, 8]));
        assert_eq!(LayerChoice::parse_list(" 1, 3 ").unwrap(), Some(vec![1, 3]));
        assert!(LayerChoice::parse_list("8-6").is_err());
        assert!(LayerChoice::parse_list("x").is_err());
    }

    #[test]
    fn every_named_method_exists() {
        for n in METHOD_NAMES {
            assert_eq!(Method::from_name(n).unwrap().name, *n);
        }
        assert!(Method::from_name("nope").is_err());
    }

    #[test]
    fn prompt_sets_parse_and_round_trip() {
        let s = format!("A {{text}}{PROMPT_SEPARATOR}B {{text}} C");
        let set = PromptSet::parse(&s).unwrap();
        assert_eq!(set.templates().len(), 2);
        assert_eq!(set.first().render("x"), "A x");
        assert_eq!(set.templates()[1].render("x"), "B x C");
        assert_eq!(set.source(), s);
        let one = PromptSet::parse(PROMPTEOL).unwrap();
        assert_eq!(one.templates().len(), 1);
        assert_eq!(one.source(), PROMPTEOL);
        // Every part needs its placeholder; an empty part is no template.
        assert!(PromptSet::parse(&format!("A {{text}}{PROMPT_SEPARATOR}B")).is_err());
        assert!(PromptSet::parse(&format!("A {{text}}{PROMPT_SEPARATOR}")).is_err());
    }

    #[test]
    fn ensembles_are_their_single_prompt_methods_with_three_prompts() {
        let named = |n: &str| Method::from_name(n).unwrap();
        for (ens, single) in [("kv-ensemble", "kv"), ("prompteol-ensemble", "prompteol")] {
            let (e, s) = (named(ens), named(single));
            for role in [kvembed_proto::Role::Document, kvembed_proto::Role::Query] {
                let (pe, ps) = (e.prompts(role), s.prompts(role));
                assert_eq!(pe.templates().len(), 3, "{ens}");
                assert_eq!(pe.first(), ps.first(), "{ens}: PromptEOL first");
                // The variants end like PromptEOL: the same junction with the text.
                for t in pe.templates() {
                    assert_eq!(t.pieces.last(), ps.first().pieces.last(), "{ens}");
                }
            }
            assert_eq!(e.pooling, s.pooling);
            assert_eq!(
                e.reroute.map(|r| r.layers),
                s.reroute.map(|r| r.layers),
                "{ens}"
            );
            assert_eq!(e.prepend, s.prepend);
        }
        assert!(KE.contains("actions, while") && KE.contains("mind , this sentence"));
        // An override replaces the whole set.
        let o = EmbedOptions {
            document_prompt: Some(PROMPTEOL.into()),
            ..Default::default()
        };
        let m = named("kv-ensemble").with_options(&o).unwrap();
        assert_eq!(m.document.templates().len(), 1);
        assert_eq!(m.query.templates().len(), 3);
    }

    #[test]
    fn kv_tp_is_kv_with_token_prepending() {
        let named = |n: &str| Method::from_name(n).unwrap();
        let (kv, tp, both) = (named("kv"), named("token-prepending"), named("kv-tp"));
        assert_eq!(both.document, kv.document);
        assert_eq!(both.query, kv.query);
        assert_eq!(both.reroute.unwrap().layers, kv.reroute.unwrap().layers);
        assert_eq!(both.prepend, tp.prepend);
        assert!(kv.prepend.is_none() && tp.reroute.is_none());
    }

    #[test]
    fn overrides_apply() {
        let o = EmbedOptions {
            bias: Some(3.0),
            layers: Some(vec![1, 2]),
            ..Default::default()
        };
        let m = Method::from_name("kv").unwrap().with_options(&o).unwrap();
        let r = m.reroute.unwrap();
        assert_eq!(r.bias, 3.0);
        assert_eq!(r.layers, LayerChoice::Fixed(vec![1, 2]));
        let bad = EmbedOptions {
            bias: Some(f32::NAN),
            ..Default::default()
        };
        assert!(Method::from_name("kv").unwrap().with_options(&bad).is_err());
    }
}

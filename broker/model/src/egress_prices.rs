//! Egress prices per (provider, source region, destination): the table of
//! `broker/data/region_egress_prices.csv` (compiled from the providers' public price lists,
//! sources in `broker/data/SOURCES.md`), optionally overridden by the operator's own table
//! (negotiated rates), with the four tiers of [`crate::PriceTable`] as the fallback.
//!
//! Why not tiers alone: providers price inter-region transfer by where it leaves, not by a
//! flat "cross region" rate. AWS charges $0.02/GB out of North American and European regions
//! but $0.09 out of Singapore and $0.138 out of São Paulo; GCP and Azure price by continent
//! (pair). A tier model sees all of those as one price and picks dearer splits.
//!
//! A row is `provider,from,to,usd_per_gb[,source]`:
//! - `from`: a region of `provider`, `continent:<name>` (regions of that continent, as
//!   `regions.csv` files them), or `*` (any region of `provider`);
//! - `to`: the same forms (another region of the same provider), or `internet` (traffic
//!   leaving the provider: to another cloud);
//! - lines starting with `#` are comments; a (provider, from, to) key appears once.
//!
//! A request crosses twice: its bytes leave the source, the response's bytes leave the
//! destination; [`EgressPrices::request_price`] blends the two directions' prices by the
//! requests' share of the bytes (one half until bytes are measured).
//!
//! Lookup of the price from cluster `a` to cluster `b` ([`EgressPrices::price`]):
//! - `a` and `b` on different providers: the `internet` row of `a`'s region;
//! - same provider, same region: no row (zones are priced by the tiers: same / cross zone);
//! - same provider, different regions: the row of `a`'s provider that matches both ends,
//!   the most specific one winning — the source's form first (region > continent > `*`),
//!   then the destination's; an operator row wins over every built-in row;
//! - nothing matches (e.g. a region the table does not know): `None`, and the caller uses
//!   the tiers.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

use crate::data::RegionData;

/// The requests' share of a service's bytes (request + response) when none is measured:
/// one half, i.e. both directions weigh alike — what a tier price (one price for both
/// directions) assumes too.
pub const DEFAULT_REQUEST_BYTE_SHARE: f64 = 0.5;

const BUILTIN_CSV: &str = include_str!("../../data/region_egress_prices.csv");

/// A price table that does not parse or holds a bad value; names the table, the row (line
/// of the file, 1-based, header = 1) and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{table}: row {line}, {field}: {message}")]
pub struct PriceTableError {
    pub table: String,
    pub line: u64,
    pub field: &'static str,
    pub message: String,
}

/// One end of a price row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// One region.
    Region(String),
    /// Every region of a continent (`continent:<name>`).
    Continent(String),
    /// Every region of the provider (`*`).
    Any,
    /// Leaving the provider (`to` only).
    Internet,
}

impl Endpoint {
    /// Higher = more specific.
    fn specificity(&self) -> u8 {
        match self {
            Self::Region(_) | Self::Internet => 2,
            Self::Continent(_) => 1,
            Self::Any => 0,
        }
    }

    fn matches(&self, region: &str, continent: Option<&str>) -> bool {
        match self {
            Self::Region(r) => r == region,
            Self::Continent(c) => continent == Some(c.as_str()),
            Self::Any => true,
            Self::Internet => false,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Region(r) => f.write_str(r),
            Self::Continent(c) => write!(f, "continent:{c}"),
            Self::Any => f.write_str("*"),
            Self::Internet => f.write_str("internet"),
        }
    }
}

/// One validated row.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceRule {
    pub provider: String,
    pub from: Endpoint,
    pub to: Endpoint,
    pub usd_per_gb: f64,
    /// Where the figure comes from (a key of `SOURCES.md`, or the operator's note).
    pub source: String,
}

/// One price row given outside a file (the policy CRD's `spec.egressPrices`).
#[derive(Debug, Clone, PartialEq)]
pub struct PriceRow {
    pub provider: String,
    pub from: String,
    pub to: String,
    pub usd_per_gb: f64,
    /// Where the figure comes from (free text).
    pub source: String,
}

#[derive(Deserialize)]
struct RawRow {
    provider: String,
    from: String,
    to: String,
    usd_per_gb: String,
    #[serde(default)]
    source: String,
}

/// The price rules in force: the operator's (if any) over the built-in ones.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EgressPrices {
    /// (provider, region) -> continent, from `regions.csv`.
    continents: HashMap<(String, String), String>,
    operator: Vec<PriceRule>,
    builtin: Vec<PriceRule>,
}

/// What a price lookup found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PriceMatch<'a> {
    pub usd_per_gb: f64,
    pub rule: &'a PriceRule,
    /// Whether the operator's table set it.
    pub operator: bool,
}

impl EgressPrices {
    /// The built-in table (`broker/data/region_egress_prices.csv`, as embedded in this build).
    ///
    /// # Errors
    /// The embedded data does not parse (a bug caught by this crate's tests).
    pub fn builtin() -> Result<Self, PriceTableError> {
        let regions = RegionData::embedded().map_err(|e| PriceTableError {
            table: "regions.csv".into(),
            line: 0,
            field: "-",
            message: e.to_string(),
        })?;
        let continents = regions
            .regions()
            .iter()
            .map(|r| ((r.provider.clone(), r.region.clone()), r.continent.clone()))
            .collect();
        let mut out = Self {
            continents,
            operator: Vec::new(),
            builtin: Vec::new(),
        };
        out.builtin = out.parse_rules("region_egress_prices.csv", BUILTIN_CSV)?;
        Ok(out)
    }

    /// No table at all: every lookup falls back to the tiers.
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }

    /// These rules with the operator's table `text` (named `table` in errors) over them.
    /// The whole table is checked before anything is applied.
    ///
    /// # Errors
    /// The first bad row: unknown provider, region or continent, a price that is negative,
    /// NaN or infinite, a duplicate key, `internet` as a source.
    pub fn with_operator_table(mut self, table: &str, text: &str) -> Result<Self, PriceTableError> {
        self.operator = self.parse_rules(table, text)?;
        Ok(self)
    }

    /// The operator's rules in force.
    #[must_use]
    pub fn operator_rules(&self) -> &[PriceRule] {
        &self.operator
    }

    /// The built-in rules.
    #[must_use]
    pub fn builtin_rules(&self) -> &[PriceRule] {
        &self.builtin
    }

    fn parse_rules(&self, table: &str, text: &str) -> Result<Vec<PriceRule>, PriceTableError> {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .comment(Some(b'#'))
            .flexible(true)
            .from_reader(text.as_bytes());
        let headers = reader
            .headers()
            .map_err(|e| PriceTableError {
                table: table.to_owned(),
                line: 1,
                field: "-",
                message: e.to_string(),
            })?
            .clone();
        let mut rows = Vec::new();
        for record in reader.records() {
            let err = |line: u64, field: &'static str, message: String| PriceTableError {
                table: table.to_owned(),
                line,
                field,
                message,
            };
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, csv::Position::line);
                err(line, "-", e.to_string())
            })?;
            let line = record.position().map_or(0, csv::Position::line);
            let row: RawRow = record
                .deserialize(Some(&headers))
                .map_err(|e| err(line, "-", e.to_string()))?;
            rows.push((line, row));
        }
        self.check_rows(table, rows)
    }

    /// These rules with `rows` over the operator's: a row here replaces an operator row of
    /// the same (provider, from, to) and, like those, wins over every built-in row. Errors
    /// name the row by its index in `rows` (as `row N`) and the field. Nothing is applied
    /// unless every row is good.
    ///
    /// # Errors
    /// The first bad row, as [`EgressPrices::with_operator_table`].
    pub fn with_override_rows(
        mut self,
        table: &str,
        rows: &[PriceRow],
    ) -> Result<Self, PriceTableError> {
        let raw = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    i as u64,
                    RawRow {
                        provider: r.provider.clone(),
                        from: r.from.clone(),
                        to: r.to.clone(),
                        usd_per_gb: r.usd_per_gb.to_string(),
                        source: r.source.clone(),
                    },
                )
            })
            .collect();
        let over = self.check_rows(table, raw)?;
        self.operator.retain(|o| {
            !over
                .iter()
                .any(|n| n.provider == o.provider && n.from == o.from && n.to == o.to)
        });
        self.operator.splice(0..0, over);
        Ok(self)
    }

    fn check_rows(
        &self,
        table: &str,
        rows: Vec<(u64, RawRow)>,
    ) -> Result<Vec<PriceRule>, PriceTableError> {
        let providers: BTreeSet<&str> = self.continents.keys().map(|(p, _)| p.as_str()).collect();
        let continent_names: BTreeSet<&str> =
            self.continents.values().map(String::as_str).collect();
        let mut keys = BTreeSet::new();
        let mut out = Vec::new();
        for (line, row) in rows {
            let err = |line: u64, field: &'static str, message: String| PriceTableError {
                table: table.to_owned(),
                line,
                field,
                message,
            };
            let provider = row.provider.to_ascii_lowercase();
            if !providers.contains(provider.as_str()) {
                return Err(err(
                    line,
                    "provider",
                    format!(
                        "unknown provider {:?} (known: {})",
                        row.provider,
                        providers.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            let endpoint = |field: &'static str, s: &str| -> Result<Endpoint, PriceTableError> {
                if s == "*" {
                    Ok(Endpoint::Any)
                } else if s == "internet" {
                    if field == "from" {
                        Err(err(line, field, "internet is a destination only".into()))
                    } else {
                        Ok(Endpoint::Internet)
                    }
                } else if let Some(c) = s.strip_prefix("continent:") {
                    if continent_names.contains(c) {
                        Ok(Endpoint::Continent(c.to_owned()))
                    } else {
                        Err(err(
                            line,
                            field,
                            format!(
                                "unknown continent {c:?} (known: {})",
                                continent_names
                                    .iter()
                                    .copied()
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ))
                    }
                } else if self
                    .continents
                    .contains_key(&(provider.clone(), s.to_owned()))
                {
                    Ok(Endpoint::Region(s.to_owned()))
                } else {
                    Err(err(
                        line,
                        field,
                        format!(
                            "unknown {provider} region {s:?} (regions.csv lists the known ones)"
                        ),
                    ))
                }
            };
            let from = endpoint("from", &row.from)?;
            let to = endpoint("to", &row.to)?;
            let usd_per_gb: f64 = row.usd_per_gb.parse().map_err(|_| {
                err(
                    line,
                    "usd_per_gb",
                    format!("{:?} is not a number", row.usd_per_gb),
                )
            })?;
            if !usd_per_gb.is_finite() || usd_per_gb < 0.0 {
                return Err(err(
                    line,
                    "usd_per_gb",
                    format!("{usd_per_gb} is not a finite non-negative price"),
                ));
            }
            if !keys.insert((provider.clone(), from.clone(), to.clone())) {
                return Err(err(
                    line,
                    "from",
                    format!("duplicate row for {provider} {from} -> {to}"),
                ));
            }
            out.push(PriceRule {
                provider,
                from,
                to,
                usd_per_gb,
                source: row.source,
            });
        }
        Ok(out)
    }

    /// The price per GB of a request's traffic between cluster `a` (the source, which sends
    /// the request) and `b` (the destination, which sends the response back): request bytes
    /// leave `a` at `price(a -> b)`, response bytes leave `b` at `price(b -> a)`, so the
    /// blend is `request_share x price(a -> b) + (1 - request_share) x price(b -> a)`, with
    /// `request_share` the requests' share of the bytes (clamped to [0, 1]). `None` unless the
    /// table covers both directions (then the caller uses the tiers, symmetric anyway).
    #[must_use]
    pub fn request_price(
        &self,
        a: (&str, &str),
        b: (&str, &str),
        request_share: f64,
    ) -> Option<f64> {
        let share = if request_share.is_finite() {
            request_share.clamp(0.0, 1.0)
        } else {
            DEFAULT_REQUEST_BYTE_SHARE
        };
        let there = self.price(a.0, a.1, b.0, b.1)?.usd_per_gb;
        let back = self.price(b.0, b.1, a.0, a.1)?.usd_per_gb;
        Some(share * there + (1.0 - share) * back)
    }

    /// The continent `regions.csv` files `provider`'s `region` under.
    #[must_use]
    pub fn continent(&self, provider: &str, region: &str) -> Option<&str> {
        self.continents
            .get(&(provider.to_owned(), region.to_owned()))
            .map(String::as_str)
    }

    /// The price per GB of traffic from (`from_provider`, `from_region`) to (`to_provider`,
    /// `to_region`), or `None` where the table does not cover the pair (see the module doc).
    #[must_use]
    pub fn price<'a>(
        &'a self,
        from_provider: &str,
        from_region: &str,
        to_provider: &str,
        to_region: &str,
    ) -> Option<PriceMatch<'a>> {
        let cross_provider = from_provider != to_provider;
        if !cross_provider && from_region == to_region {
            return None;
        }
        let from_continent = self.continent(from_provider, from_region);
        let to_continent = self.continent(to_provider, to_region);
        let applies = |r: &PriceRule| {
            r.provider == from_provider
                && r.from.matches(from_region, from_continent)
                && if cross_provider {
                    r.to == Endpoint::Internet
                } else {
                    r.to.matches(to_region, to_continent)
                }
        };
        let best = |rules: &'a [PriceRule]| -> Option<&'a PriceRule> {
            rules
                .iter()
                .filter(|r| applies(r))
                .max_by_key(|r| (r.from.specificity(), r.to.specificity()))
        };
        if let Some(rule) = best(&self.operator) {
            return Some(PriceMatch {
                usd_per_gb: rule.usd_per_gb,
                rule,
                operator: true,
            });
        }
        best(&self.builtin).map(|rule| PriceMatch {
            usd_per_gb: rule.usd_per_gb,
            rule,
            operator: false,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(t: &EgressPrices, a: (&str, &str), b: (&str, &str)) -> Option<f64> {
        t.price(a.0, a.1, b.0, b.1).map(|m| m.usd_per_gb)
    }

    #[test]
    fn the_builtin_table_prices_by_source_region_and_continent() {
        let t = EgressPrices::builtin().unwrap();
        // AWS: by source region.
        assert_eq!(
            p(&t, ("aws", "us-east-1"), ("aws", "eu-west-1")),
            Some(0.02)
        );
        assert_eq!(
            p(&t, ("aws", "us-east-1"), ("aws", "us-east-2")),
            Some(0.01)
        );
        assert_eq!(
            p(&t, ("aws", "ap-southeast-1"), ("aws", "us-east-1")),
            Some(0.09)
        );
        assert_eq!(
            p(&t, ("aws", "sa-east-1"), ("aws", "us-east-1")),
            Some(0.138)
        );
        // Two directions, two prices.
        assert_eq!(
            p(&t, ("aws", "us-east-1"), ("aws", "sa-east-1")),
            Some(0.02)
        );
        // Leaving the provider: the source region's internet rate.
        assert_eq!(p(&t, ("aws", "sa-east-1"), ("gcp", "us-east1")), Some(0.15));
        assert_eq!(
            p(&t, ("azure", "brazilsouth"), ("aws", "us-east-1")),
            Some(0.181)
        );
        // GCP by continent pair; Oceania dearer both ways; Jakarta within Asia is Asia's rate.
        assert_eq!(p(&t, ("gcp", "us-east1"), ("gcp", "us-west1")), Some(0.02));
        assert_eq!(
            p(&t, ("gcp", "us-east1"), ("gcp", "europe-west1")),
            Some(0.08)
        );
        assert_eq!(
            p(&t, ("gcp", "us-east1"), ("gcp", "australia-southeast1")),
            Some(0.15)
        );
        assert_eq!(
            p(
                &t,
                ("gcp", "australia-southeast1"),
                ("gcp", "australia-southeast2")
            ),
            Some(0.08)
        );
        assert_eq!(
            p(&t, ("gcp", "asia-southeast2"), ("gcp", "asia-east1")),
            Some(0.05)
        );
        assert_eq!(
            p(&t, ("gcp", "asia-southeast2"), ("gcp", "us-east1")),
            Some(0.15)
        );
        // Azure by the source's zone of the world.
        assert_eq!(p(&t, ("azure", "eastus"), ("azure", "westus")), Some(0.02));
        assert_eq!(
            p(&t, ("azure", "eastus"), ("azure", "westeurope")),
            Some(0.05)
        );
        assert_eq!(
            p(&t, ("azure", "japaneast"), ("azure", "westeurope")),
            Some(0.08)
        );
        assert_eq!(
            p(&t, ("azure", "brazilsouth"), ("azure", "eastus")),
            Some(0.16)
        );
        // Same region: zones are the tiers' business; unknown regions: not covered.
        assert_eq!(p(&t, ("aws", "us-east-1"), ("aws", "us-east-1")), None);
        assert_eq!(p(&t, ("aws", "eu-west-3"), ("aws", "us-east-1")), None);
        assert_eq!(p(&t, ("oracle", "x"), ("oracle", "y")), None);
    }

    #[test]
    fn every_builtin_region_pair_is_covered() {
        let t = EgressPrices::builtin().unwrap();
        let d = RegionData::embedded().unwrap();
        for a in d.regions() {
            for b in d.regions() {
                if a.region == b.region {
                    continue;
                }
                assert!(
                    p(&t, (&a.provider, &a.region), (&b.provider, &b.region)).is_some(),
                    "{} -> {}",
                    a.region,
                    b.region
                );
            }
        }
    }

    #[test]
    fn an_operator_row_wins_over_every_builtin_row() {
        let t = EgressPrices::builtin()
            .unwrap()
            .with_operator_table(
                "negotiated.csv",
                "provider,from,to,usd_per_gb,source\naws,*,*,0.005,contract 2026\n",
            )
            .unwrap();
        let m = t.price("aws", "sa-east-1", "aws", "us-east-1").unwrap();
        assert_eq!((m.usd_per_gb, m.operator), (0.005, true));
        // Not covered by the operator: the built-in row.
        let m = t.price("aws", "sa-east-1", "gcp", "us-east1").unwrap();
        assert_eq!((m.usd_per_gb, m.operator), (0.15, false));
    }

    #[test]
    fn override_rows_win_over_the_operator_file_and_bad_ones_are_named_by_index() {
        let row = |from: &str, to: &str, usd_per_gb: f64| PriceRow {
            provider: "aws".into(),
            from: from.into(),
            to: to.into(),
            usd_per_gb,
            source: "crd".into(),
        };
        let file = EgressPrices::builtin()
            .unwrap()
            .with_operator_table(
                "negotiated.csv",
                "provider,from,to,usd_per_gb,source\naws,*,*,0.005,contract 2026\naws,sa-east-1,*,0.05,contract\n",
            )
            .unwrap();
        let t = file
            .clone()
            .with_override_rows("spec.egressPrices", &[row("sa-east-1", "*", 0.001)])
            .unwrap();
        // the same key: the override's figure
        let m = t.price("aws", "sa-east-1", "aws", "us-east-1").unwrap();
        assert_eq!(
            (m.usd_per_gb, m.operator, m.rule.source.as_str()),
            (0.001, true, "crd")
        );
        // another key of the file stays
        let m = t.price("aws", "us-west-2", "aws", "us-east-1").unwrap();
        assert_eq!(m.usd_per_gb, 0.005);
        assert_eq!(t.operator_rules().len(), 2);
        for (bad, named) in [
            (
                vec![row("us-east-1", "*", 0.01), row("us-east-1", "*", -1.0)],
                "row 1, usd_per_gb",
            ),
            (vec![row("us-east-1", "*", f64::NAN)], "row 0, usd_per_gb"),
            (vec![row("moon-1", "*", 0.01)], "row 0, from"),
            (vec![row("internet", "*", 0.01)], "row 0, from"),
            (
                vec![row("us-east-1", "*", 0.01), row("us-east-1", "*", 0.02)],
                "row 1, from",
            ),
        ] {
            let e = file
                .clone()
                .with_override_rows("spec.egressPrices", &bad)
                .expect_err(named)
                .to_string();
            assert!(
                e.contains(named) && e.starts_with("spec.egressPrices"),
                "{named}: {e}"
            );
        }
    }

    #[test]
    fn bad_rows_are_refused_naming_row_and_field() {
        let t = EgressPrices::builtin().unwrap();
        let cases = [
            ("aws,us-east-1,*,-0.01", "row 2, usd_per_gb", "non-negative"),
            ("aws,us-east-1,*,NaN", "row 2, usd_per_gb", "non-negative"),
            ("aws,us-east-1,*,inf", "row 2, usd_per_gb", "non-negative"),
            ("aws,us-east-1,*,cheap", "row 2, usd_per_gb", "not a number"),
            ("aws,us-moon-1,*,0.01", "row 2, from", "unknown aws region"),
            (
                "aws,us-east-1,westeurope,0.01",
                "row 2, to",
                "unknown aws region",
            ),
            ("oracle,*,*,0.01", "row 2, provider", "unknown provider"),
            (
                "aws,continent:atlantis,*,0.01",
                "row 2, from",
                "unknown continent",
            ),
            ("aws,internet,*,0.01", "row 2, from", "destination only"),
            (
                "aws,*,*,0.01\naws,*,*,0.02",
                "row 3, from",
                "duplicate row for aws * -> *",
            ),
        ];
        for (rows, at, what) in cases {
            let text = format!("provider,from,to,usd_per_gb\n{rows}\n");
            let e = t
                .clone()
                .with_operator_table("op.csv", &text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("op.csv: {at}:")), "{rows}: {e}");
            assert!(e.contains(what), "{rows}: {e}");
        }
    }
}

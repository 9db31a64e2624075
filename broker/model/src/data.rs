//! The public data in `broker/data/` (see `SOURCES.md` there): 69 AWS, GCP and Azure regions
//! with their provider and continent, the measured RTT between them, and each provider's
//! egress price tiers. Embedded at build time and read with the `csv` crate, once for
//! everyone who needs them: the lab's defaults (WAN delays, prices), the solver bench, tests.

use std::collections::HashMap;

use serde::Deserialize;

use crate::PriceTable;

const REGIONS_CSV: &str = include_str!("../../data/regions.csv");
const RTT_CSV: &str = include_str!("../../data/region_rtt_ms.csv");
const PRICES_CSV: &str = include_str!("../../data/egress_prices.csv");

/// A data file that does not parse; names the file and the record.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {source}")]
pub struct DataError {
    file: &'static str,
    #[source]
    source: csv::Error,
}

/// One cloud region.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Region {
    pub region: String,
    pub provider: String,
    pub continent: String,
}

#[derive(Deserialize)]
struct RttRow {
    src: String,
    dst: String,
    rtt_ms: f64,
}

#[derive(Deserialize)]
struct PriceRow {
    provider: String,
    tier: String,
    usd_per_gb: f64,
}

/// Regions, inter-region RTT and egress prices.
#[derive(Debug, Clone)]
pub struct RegionData {
    regions: Vec<Region>,
    by_name: HashMap<String, usize>,
    rtt: HashMap<(String, String), f64>,
    /// (provider, tier) -> USD per GB.
    prices: HashMap<(String, String), f64>,
}

fn read<T: for<'de> Deserialize<'de>>(file: &'static str, text: &str) -> Result<Vec<T>, DataError> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes())
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|source| DataError { file, source })
}

impl RegionData {
    /// The tables of `broker/data/`, as embedded in this build.
    ///
    /// # Errors
    /// A file that does not parse (a bug in the data, caught by this crate's tests).
    pub fn embedded() -> Result<Self, DataError> {
        Self::parse(REGIONS_CSV, RTT_CSV, PRICES_CSV)
    }

    /// Tables from CSV text with the headers of `broker/data/`.
    ///
    /// # Errors
    /// A record that does not parse, naming its file.
    pub fn parse(regions: &str, rtt: &str, prices: &str) -> Result<Self, DataError> {
        let regions: Vec<Region> = read("regions.csv", regions)?;
        let by_name = regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.region.clone(), i))
            .collect();
        let rtt = read::<RttRow>("region_rtt_ms.csv", rtt)?
            .into_iter()
            .map(|r| ((r.src, r.dst), r.rtt_ms))
            .collect();
        let prices = read::<PriceRow>("egress_prices.csv", prices)?
            .into_iter()
            .map(|r| ((r.provider, r.tier), r.usd_per_gb))
            .collect();
        Ok(Self {
            regions,
            by_name,
            rtt,
            prices,
        })
    }

    /// Every region, in file order.
    #[must_use]
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// One region by name.
    #[must_use]
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.by_name.get(name).map(|i| &self.regions[*i])
    }

    /// The RTT measured from `src` to `dst`, as the file states it (one direction).
    #[must_use]
    pub fn measured_rtt_ms(&self, src: &str, dst: &str) -> Option<f64> {
        self.rtt.get(&(src.to_owned(), dst.to_owned())).copied()
    }

    /// Measured RTT between two different regions: the mean of both directions when both
    /// were measured, else the one that was. `None` for a region with itself or an unknown
    /// pair.
    #[must_use]
    pub fn rtt_ms(&self, a: &str, b: &str) -> Option<f64> {
        let ab = self.rtt.get(&(a.to_owned(), b.to_owned()));
        let ba = self.rtt.get(&(b.to_owned(), a.to_owned()));
        match (ab, ba) {
            (Some(x), Some(y)) => Some(f64::midpoint(*x, *y)),
            (Some(x), None) | (None, Some(x)) => Some(*x),
            (None, None) => None,
        }
    }

    /// The list price (USD/GB) of `provider`'s egress `tier` (`same_zone`, `cross_zone`,
    /// `cross_region_same_continent`, `cross_continent`, `internet_egress_first_tier`).
    #[must_use]
    pub fn price(&self, provider: &str, tier: &str) -> Option<f64> {
        self.prices
            .get(&(provider.to_owned(), tier.to_owned()))
            .copied()
    }

    /// `provider`'s prices as the model's four tiers (cross region = same continent;
    /// internet = first tier). `None` when a tier is missing.
    #[must_use]
    pub fn price_table(&self, provider: &str) -> Option<PriceTable> {
        Some(PriceTable {
            same_zone: self.price(provider, "same_zone")?,
            cross_zone: self.price(provider, "cross_zone")?,
            cross_region: self.price(provider, "cross_region_same_continent")?,
            internet: self.price(provider, "internet_egress_first_tier")?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_embedded_tables_parse_and_hold_what_their_sources_say() {
        let d = RegionData::embedded().unwrap();
        assert_eq!(d.regions().len(), 69);
        let r = d.region("us-east-1").unwrap();
        assert_eq!(
            (r.provider.as_str(), r.continent.as_str()),
            ("aws", "north_america")
        );
        let ab = d.rtt_ms("us-east-1", "us-west-2").unwrap();
        assert!((40.0..100.0).contains(&ab), "{ab}");
        assert_eq!(
            d.rtt_ms("us-east-1", "us-west-2"),
            d.rtt_ms("us-west-2", "us-east-1")
        );
        assert_eq!(d.rtt_ms("us-east-1", "us-east-1"), None);
        let aws = d.price_table("aws").unwrap();
        assert_eq!(
            (aws.cross_zone, aws.cross_region, aws.internet),
            (0.01, 0.02, 0.09)
        );
        assert_eq!(d.price("azure", "cross_continent"), Some(0.05));
        assert!(d.price_table("oracle").is_none());
    }

    #[test]
    fn a_bad_record_names_its_file() {
        let e = RegionData::parse(
            "region,provider,continent\nx,aws,eu\n",
            "src,dst,rtt_ms\na,b,fast\n",
            "provider,tier,usd_per_gb\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("region_rtt_ms.csv:"), "{e}");
    }
}

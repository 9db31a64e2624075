//! [`ServiceTime`]: a service time per request as a function of load, as a ServiceExport
//! annotation (`ballast.io/service-time`), a topology file and the lab's echo backend spell it.

use serde::Serialize;

/// A service time per request as a function of load: `base_ms + slope_ms_per_rps x load`
/// (ms), both finite and >= 0. Declared per pod (load = the pod's RPS); a cluster of `n`
/// ready pods sharing the load evenly has the curve `base_ms + slope_ms_per_rps / n x load`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServiceTime {
    pub base_ms: f64,
    pub slope_ms_per_rps: f64,
}

impl ServiceTime {
    /// Parses `base_ms=<ms>,slope_ms_per_rps=<ms per RPS>` (the ServiceExport annotation),
    /// both keys required once, values finite and >= 0.
    ///
    /// # Errors
    /// What is wrong, naming the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut base, mut slope) = (None, None);
        for part in text.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            let value: f64 = v
                .parse()
                .map_err(|_| format!("{k}: {v:?} is not a number"))?;
            let slot = match k {
                "base_ms" => &mut base,
                "slope_ms_per_rps" => &mut slope,
                other => {
                    return Err(format!(
                        "unknown key {other:?} (expected base_ms and slope_ms_per_rps)"
                    ))
                }
            };
            if slot.replace(value).is_some() {
                return Err(format!("{k}: given twice"));
            }
        }
        let curve = Self {
            base_ms: base.ok_or("base_ms: missing")?,
            slope_ms_per_rps: slope.ok_or("slope_ms_per_rps: missing")?,
        };
        curve.check()?;
        Ok(curve)
    }

    /// Refuses a negative or non-finite value, naming it.
    ///
    /// # Errors
    /// What is wrong, naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (k, v) in [
            ("base_ms", self.base_ms),
            ("slope_ms_per_rps", self.slope_ms_per_rps),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "{k}: {v} is not a finite number >= 0 (a service time that falls with load \
                     is not convex)"
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for ServiceTime {
    /// The spelling [`ServiceTime::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "base_ms={},slope_ms_per_rps={}",
            self.base_ms, self.slope_ms_per_rps
        )
    }
}

#[cfg(test)]
mod tests {
    use super::ServiceTime;

    #[test]
    fn the_annotation_parses_and_bad_values_are_named() {
        assert_eq!(
            ServiceTime::parse("base_ms=20, slope_ms_per_rps=0.05"),
            Ok(ServiceTime {
                base_ms: 20.0,
                slope_ms_per_rps: 0.05
            })
        );
        for (bad, named) in [
            ("base_ms=20", "slope_ms_per_rps: missing"),
            ("base_ms=-1,slope_ms_per_rps=0", "base_ms: -1"),
            ("base_ms=1,slope_ms_per_rps=NaN", "slope_ms_per_rps: NaN"),
            ("base_ms=1,slope_ms_per_rps=x", "slope_ms_per_rps: \"x\""),
            (
                "base_ms=1,base_ms=2,slope_ms_per_rps=0",
                "base_ms: given twice",
            ),
            ("base=1,slope_ms_per_rps=0", "unknown key \"base\""),
            ("20ms", "not key=value"),
        ] {
            let e = ServiceTime::parse(bad).expect_err(bad);
            assert!(e.contains(named), "{bad}: {e}");
        }
    }

    #[test]
    fn the_display_spelling_parses_back() {
        let c = ServiceTime {
            base_ms: 2.5,
            slope_ms_per_rps: 0.125,
        };
        assert_eq!(c.to_string(), "base_ms=2.5,slope_ms_per_rps=0.125");
        assert_eq!(ServiceTime::parse(&c.to_string()), Ok(c));
    }
}

//! The garbage-collection counters a HotSpot JVM publishes in its perf data file
//! (`/tmp/hsperfdata_USER/PID`, what `jstat` reads): per collector its name, how many
//! collections it ran, and when the last one started and ended, on the JVM's own clock
//! (`sun.os.hrt.ticks`, sampled every 50 ms, at `sun.os.hrt.frequency` ticks a second).
//! `explain` asks whether a full collection has run since a socket entered CLOSE_WAIT: a
//! Socket the program dropped does not survive one (its Cleaner closes the fd).
//!
//! The file is shared memory the JVM keeps writing; it is read once with read(2), not
//! mapped, so nothing of the JVM's can hold cwreap up but the file system (the caller reads
//! it under a deadline). Anything that is not what HotSpot writes is an error, never a
//! panic.

use std::collections::BTreeMap;

/// A perf data file starts with these bytes, whatever its byte order.
const MAGIC: [u8; 4] = [0xca, 0xfe, 0xc0, 0xc0];
/// The prologue: magic, byte order, major and minor version, accessible flag, used,
/// overflow, modification time stamp, entry offset, number of entries.
const PROLOGUE: usize = 32;
/// An entry's header: length, name offset, vector length, type, flags, units,
/// variability, data offset.
const ENTRY: usize = 20;

/// One collector of a JVM (`sun.gc.collector.N`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collector {
    /// `Serial full collection pauses`, `G1 young collection pauses`, ...
    pub name: String,
    pub invocations: i64,
    /// When the last collection started and ended, in ticks of the JVM's clock (0: never).
    pub last_entry_ticks: i64,
    pub last_exit_ticks: i64,
}

/// What a JVM's perf data says of its collections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JvmGc {
    /// Ticks a second of the JVM's clock.
    pub frequency: i64,
    /// The JVM's clock when it last sampled its counters.
    pub now_ticks: i64,
    /// By collector number.
    pub collectors: Vec<Collector>,
}

/// A value of the perf data: a 64-bit number or a string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Long(i64),
    Text(String),
}

/// Reads numbers of one byte order from a buffer, failing past its end.
struct Reader<'a> {
    b: &'a [u8],
    little: bool,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Result<[u8; N], String> {
        at.checked_add(N)
            .and_then(|end| self.b.get(at..end))
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or_else(|| format!("truncated at byte {at}"))
    }

    fn i32(&self, at: usize) -> Result<i32, String> {
        let b = self.bytes::<4>(at)?;
        Ok(if self.little {
            i32::from_le_bytes(b)
        } else {
            i32::from_be_bytes(b)
        })
    }

    fn i64(&self, at: usize) -> Result<i64, String> {
        let b = self.bytes::<8>(at)?;
        Ok(if self.little {
            i64::from_le_bytes(b)
        } else {
            i64::from_be_bytes(b)
        })
    }

    /// An offset or a length: an i32 that must not be negative.
    fn index(&self, at: usize) -> Result<usize, String> {
        let v = self.i32(at)?;
        usize::try_from(v).map_err(|_| format!("negative offset {v} at byte {at}"))
    }

    /// A NUL-terminated string at `at`, at most up to `end`.
    fn cstr(&self, at: usize, end: usize) -> Result<String, String> {
        let s = self
            .b
            .get(at..end.min(self.b.len()))
            .ok_or_else(|| format!("string at byte {at} out of the file"))?;
        let len = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        Ok(String::from_utf8_lossy(&s[..len]).into_owned())
    }
}

/// Every scalar long and every string of a perf data file, by name.
fn entries(b: &[u8]) -> Result<BTreeMap<String, Value>, String> {
    if b.get(..4) != Some(MAGIC.as_slice()) {
        return Err("not a perf data file (bad magic)".into());
    }
    let little = match b.get(4) {
        Some(0) => false,
        Some(1) => true,
        other => return Err(format!("unknown byte order {other:?}")),
    };
    if b.get(5) != Some(&2) {
        return Err(format!("perf data version {:?}, not 2", b.get(5)));
    }
    if b.get(7) != Some(&1) {
        return Err("perf data not yet accessible".into());
    }
    let r = Reader { b, little };
    let used = r.index(8)?.min(b.len());
    let mut at = r.index(24)?;
    let count = r.index(28)?;
    if at < PROLOGUE {
        return Err(format!("first entry at byte {at}, inside the prologue"));
    }
    let mut out = BTreeMap::new();
    for _ in 0..count {
        let len = r.index(at)?;
        if len < ENTRY || at.saturating_add(len) > used {
            return Err(format!(
                "entry at byte {at} of length {len} is out of place"
            ));
        }
        let end = at + len;
        let name_at = at + r.index(at + 4)?;
        let vector = r.index(at + 8)?;
        let kind = r.bytes::<1>(at + 12)?[0];
        let data_at = at + r.index(at + 16)?;
        let name = r.cstr(name_at, end)?;
        match (kind, vector) {
            (b'J', 0) => {
                out.insert(name, Value::Long(r.i64(data_at)?));
            }
            (b'B', n) if n > 0 => {
                let text = r.cstr(data_at, data_at.saturating_add(n).min(end))?;
                out.insert(name, Value::Text(text));
            }
            _ => {}
        }
        at = end;
    }
    Ok(out)
}

/// The collections of the JVM whose perf data file holds `bytes`.
pub fn parse_jvm_gc(bytes: &[u8]) -> Result<JvmGc, String> {
    let all = entries(bytes)?;
    let long = |name: &str| match all.get(name) {
        Some(Value::Long(v)) => Ok(*v),
        _ => Err(format!("no {name}")),
    };
    let mut gc = JvmGc {
        frequency: long("sun.os.hrt.frequency")?,
        now_ticks: long("sun.os.hrt.ticks")?,
        collectors: Vec::new(),
    };
    if gc.frequency <= 0 {
        return Err(format!("clock frequency {}", gc.frequency));
    }
    for n in 0.. {
        let key = |leaf: &str| format!("sun.gc.collector.{n}.{leaf}");
        let Some(Value::Text(name)) = all.get(&key("name")) else {
            break;
        };
        gc.collectors.push(Collector {
            name: name.clone(),
            invocations: long(&key("invocations"))?,
            last_entry_ticks: long(&key("lastEntryTime"))?,
            last_exit_ticks: long(&key("lastExitTime"))?,
        });
    }
    Ok(gc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A perf data file in the byte order `little`, with `longs` and `texts` as entries.
    fn perf_file(little: bool, longs: &[(&str, i64)], texts: &[(&str, &str)]) -> Vec<u8> {
        let i32b = |v: i32| {
            if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            }
        };
        let mut entries: Vec<u8> = Vec::new();
        let mut count = 0;
        let mut push = |name: &str, kind: u8, vector: i32, data: &[u8]| {
            // header (20), name with its NUL, data, padded to 8
            let name_at = ENTRY;
            let data_at = (name_at + name.len() + 1).next_multiple_of(8);
            let len = (data_at + data.len()).next_multiple_of(8);
            let mut e = vec![0u8; len];
            e[0..4].copy_from_slice(&i32b(len as i32)); // entry_length
            e[4..8].copy_from_slice(&i32b(name_at as i32)); // name_offset
            e[8..12].copy_from_slice(&i32b(vector)); // vector_length
            e[12] = kind; // data_type
            e[16..20].copy_from_slice(&i32b(data_at as i32)); // data_offset
            e[name_at..name_at + name.len()].copy_from_slice(name.as_bytes());
            e[data_at..data_at + data.len()].copy_from_slice(data);
            entries.extend_from_slice(&e);
            count += 1;
        };
        for (name, v) in longs {
            let b = if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            push(name, b'J', 0, &b);
        }
        for (name, t) in texts {
            let mut b = t.as_bytes().to_vec();
            b.push(0);
            push(name, b'B', b.len() as i32, &b);
        }
        let mut f = vec![0u8; PROLOGUE];
        f[..4].copy_from_slice(&MAGIC); // magic
        f[4] = u8::from(little); // byte_order
        f[5] = 2; // major_version
        f[6] = 0; // minor_version
        f[7] = 1; // accessible
        let used = (PROLOGUE + entries.len()) as i32;
        f[8..12].copy_from_slice(&i32b(used)); // used
        f[24..28].copy_from_slice(&i32b(PROLOGUE as i32)); // entry_offset
        f[28..32].copy_from_slice(&i32b(count)); // num_entries
        f.extend_from_slice(&entries);
        f.resize(f.len() + 64, 0); // unused space after the entries
        f
    }

    /// What a SerialGC JVM showed after one System.gc() (jstat -snap, JDK 17).
    fn serial_after_one_full_gc(little: bool) -> Vec<u8> {
        perf_file(
            little,
            &[
                ("sun.os.hrt.frequency", 1_000_000_000),
                ("sun.os.hrt.ticks", 3_063_868_411),
                ("sun.gc.collector.0.invocations", 0),
                ("sun.gc.collector.0.lastEntryTime", 0),
                ("sun.gc.collector.0.lastExitTime", 0),
                ("sun.gc.collector.1.invocations", 1),
                ("sun.gc.collector.1.lastEntryTime", 1_545_047_253),
                ("sun.gc.collector.1.lastExitTime", 1_546_234_766),
            ],
            &[
                ("sun.gc.collector.0.name", "Serial young collection pauses"),
                ("sun.gc.collector.1.name", "Serial full collection pauses"),
                ("sun.gc.cause", "No GC"),
            ],
        )
    }

    #[test]
    fn collectors_in_both_byte_orders() {
        for little in [true, false] {
            let gc = parse_jvm_gc(&serial_after_one_full_gc(little)).expect("parse");
            assert_eq!(gc.frequency, 1_000_000_000);
            assert_eq!(gc.now_ticks, 3_063_868_411);
            assert_eq!(
                gc.collectors,
                vec![
                    Collector {
                        name: "Serial young collection pauses".into(),
                        ..Collector::default()
                    },
                    Collector {
                        name: "Serial full collection pauses".into(),
                        invocations: 1,
                        last_entry_ticks: 1_545_047_253,
                        last_exit_ticks: 1_546_234_766,
                    }
                ]
            );
        }
    }

    #[test]
    fn what_hotspot_does_not_write_is_an_error() {
        let good = serial_after_one_full_gc(true);
        assert!(parse_jvm_gc(b"\x7fELF").is_err());
        assert!(parse_jvm_gc(&good[..40]).is_err(), "cut in an entry");
        let mut not_ready = good.clone();
        not_ready[7] = 0;
        assert!(
            parse_jvm_gc(&not_ready)
                .expect_err("not accessible")
                .contains("accessible")
        );
        let mut bad_len = good.clone();
        bad_len[PROLOGUE..PROLOGUE + 4].copy_from_slice(&(-8i32).to_le_bytes());
        assert!(parse_jvm_gc(&bad_len).is_err());
        let no_clock = perf_file(true, &[("sun.gc.collector.0.invocations", 1)], &[]);
        assert!(parse_jvm_gc(&no_clock).is_err());
        // A collector without its counters.
        let half = perf_file(
            true,
            &[("sun.os.hrt.frequency", 1000), ("sun.os.hrt.ticks", 5)],
            &[("sun.gc.collector.0.name", "x")],
        );
        assert!(parse_jvm_gc(&half).is_err());
        // No collectors at all is fine (-XX:-UsePerfData files have no entries at all, and
        // are not there).
        let none = perf_file(
            true,
            &[("sun.os.hrt.frequency", 1000), ("sun.os.hrt.ticks", 5)],
            &[],
        );
        assert_eq!(parse_jvm_gc(&none).expect("parse").collectors, vec![]);
    }
}

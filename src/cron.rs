//! Cron schedules for disruption budgets (Karpenter v1's `schedule` + `duration`): the
//! standard five fields (minute, hour, day of month, month, day of week) with lists,
//! ranges, steps and month/weekday names, and the `@yearly` … `@hourly` macros, in UTC.
//! A budget with a schedule is active from each time the schedule fires for `duration`.

use std::time::Duration;

/// A parsed cron schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    days_of_week: u8,
    /// Day-of-month or day-of-week given as `*`: then the other alone decides (cron's
    /// rule: when both are restricted, either may match).
    any_day_of_month: bool,
    any_day_of_week: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Schedule {
    /// Parse a schedule; the error says which field is wrong and why.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let expanded = match text.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "{other:?} is not a schedule macro (@yearly, @monthly, @weekly, @daily, @hourly)"
                ));
            }
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{text:?} has {} fields; a schedule has five (minute hour day-of-month month day-of-week)",
                fields.len()
            ));
        }
        let minutes = field(fields[0], "minute", 0, 59, &[])?;
        let hours = field(fields[1], "hour", 0, 23, &[])?;
        let days_of_month = field(fields[2], "day of month", 1, 31, &[])?;
        let months = field(fields[3], "month", 1, 12, &MONTHS)?;
        // 7 is Sunday too.
        let mut days_of_week = field(fields[4], "day of week", 0, 7, &WEEKDAYS)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & 0x7f;
        }
        Ok(Schedule {
            minutes,
            hours: hours as u32,
            days_of_month: days_of_month as u32,
            months: months as u16,
            days_of_week: days_of_week as u8,
            any_day_of_month: fields[2].starts_with('*'),
            any_day_of_week: fields[4].starts_with('*'),
        })
    }

    /// Does the schedule fire at the minute starting at `unix_minute` × 60 s?
    pub fn fires_at(&self, unix_minute: u64) -> bool {
        let minute = unix_minute % 60;
        let hour = (unix_minute / 60) % 24;
        let days = (unix_minute / 1440) as i64;
        let (_, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday.
        let weekday = ((days + 4).rem_euclid(7)) as u32;
        let dom = self.days_of_month & (1 << day) != 0;
        let dow = self.days_of_week & (1 << weekday) != 0;
        let day_matches = match (self.any_day_of_month, self.any_day_of_week) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        };
        self.minutes & (1 << minute) != 0
            && self.hours & (1 << hour) != 0
            && self.months & (1 << month) != 0
            && day_matches
    }

    /// Is a window of `duration` that opens each time the schedule fires open at
    /// `at` (time since the Unix epoch)? Looks back at most `duration`.
    pub fn active(&self, duration: Duration, at: Duration) -> bool {
        let now_minute = at.as_secs() / 60;
        let back = duration.as_secs().div_ceil(60);
        (0..=back.min(now_minute)).any(|m| {
            let start = now_minute - m;
            self.fires_at(start) && at.saturating_sub(Duration::from_secs(start * 60)) < duration
        })
    }
}

/// One field as a bit set over `min..=max`.
fn field(text: &str, what: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            // Month names count from 1, weekday names from 0.
            return Ok(i as u32 + u32::from(min == 1));
        }
        s.parse::<u32>()
            .map_err(|_| format!("{what}: {s:?} is not a number or name"))
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("{what}: step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{what}: a step of 0 never advances"));
                }
                (r, step)
            }
            None => (item, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `5/15` means from 5 to the end, every 15.
            (v, if step > 1 { max } else { v })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!(
                "{what}: {item:?} is outside {min}-{max} or an empty range"
            ));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minutes since the epoch of a UTC date and time.
    fn at(days: i64, hour: u64, minute: u64) -> Duration {
        Duration::from_secs((days as u64 * 1440 + hour * 60 + minute) * 60)
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2026-12-01 is day 20,788.
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(civil_from_days(20_512), (2026, 2, 28));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }

    #[test]
    fn business_hours_window() {
        // Weekdays 09:00 for 8 hours: Karpenter's "no disruption during business hours".
        let s = Schedule::parse("0 9 * * mon-fri").unwrap();
        let eight = Duration::from_secs(8 * 3600);
        // 2026-12-01 is a Tuesday.
        let tuesday = 20_788;
        assert!(!s.active(eight, at(tuesday, 8, 59)));
        assert!(s.active(eight, at(tuesday, 9, 0)));
        assert!(s.active(eight, at(tuesday, 16, 59)));
        assert!(!s.active(eight, at(tuesday, 17, 0)));
        // Saturday 2026-12-05: no window.
        assert!(!s.active(eight, at(tuesday + 4, 10, 0)));
    }

    #[test]
    fn macros_lists_steps_and_names() {
        let daily = Schedule::parse("@daily").unwrap();
        assert!(daily.active(Duration::from_secs(600), at(5, 0, 9)));
        assert!(!daily.active(Duration::from_secs(600), at(5, 0, 10)));
        let s = Schedule::parse("*/15 0,12 1 JAN,jul *").unwrap();
        assert!(s.fires_at(at(0, 12, 45).as_secs() / 60)); // 1970-01-01 12:45
        assert!(!s.fires_at(at(0, 12, 50).as_secs() / 60));
        assert!(!s.fires_at(at(1, 12, 45).as_secs() / 60)); // the 2nd
        // Sunday as 0 or 7; 1970-01-04 was a Sunday.
        for text in ["0 0 * * 0", "0 0 * * 7", "0 0 * * SUN"] {
            assert!(Schedule::parse(text).unwrap().fires_at(3 * 1440), "{text}");
        }
        // Both day fields restricted: either matches.
        let either = Schedule::parse("0 0 13 * fri").unwrap();
        assert!(either.fires_at(1440)); // 1970-01-02, a Friday
        assert!(either.fires_at(12 * 1440)); // the 13th, a Tuesday
        assert!(!either.fires_at(2 * 1440));
    }

    #[test]
    fn bad_schedules_name_the_field() {
        for (text, needle) in [
            ("0 9 * *", "five"),
            ("61 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * foo *", "month"),
            ("*/0 * * * *", "step of 0"),
            ("@often", "macro"),
        ] {
            let e = Schedule::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}

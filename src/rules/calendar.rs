//! Calendar periods in a time zone: what `[count] in = "week"` and `[limits] once_per_period =
//! "day"` count by. A period is the day, ISO week (from Monday) or month that an instant falls in
//! where the user is, so "once a day" means the user's day, and the days the clocks change are
//! as long as they are there (chrono-tz's copy of the IANA time-zone database).

use chrono::{DateTime, Datelike, NaiveTime, TimeDelta, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

use crate::ingest::event::Event;
use crate::ingest::path::FieldPath;

/// A kind of calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    /// ISO week: Monday to Sunday.
    Week,
    Month,
}

impl Period {
    /// The names a rule file uses.
    pub const NAMES: [&str; 3] = ["day", "week", "month"];

    pub fn named(name: &str) -> Option<Period> {
        match name {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// Where periods are counted: one time zone, or each event's own (a field holding an IANA name,
/// like PostHog's `person.properties.$geoip_time_zone`), with a zone for events without one.
#[derive(Debug, Clone)]
pub enum Zone {
    Fixed(Tz),
    Field { path: FieldPath, fallback: Tz },
}

impl Zone {
    /// The zone for `event`.
    pub fn of(&self, event: &Event) -> Tz {
        match self {
            Zone::Fixed(tz) => *tz,
            Zone::Field { path, fallback } => path
                .lookup(event)
                .and_then(|v| v.as_str())
                .and_then(|name| name.parse().ok())
                .unwrap_or(*fallback),
        }
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Zone::Fixed(tz) => f.write_str(tz.name()),
            Zone::Field { path, fallback } => write!(f, "{path} (else {})", fallback.name()),
        }
    }
}

/// A kind of period in a zone.
#[derive(Debug, Clone)]
pub struct Calendar {
    pub period: Period,
    pub zone: Zone,
}

impl Calendar {
    /// The period the instant `t_ms` falls in, where `event`'s user is: a number that grows by
    /// one from each period to the next (days, weeks or months since the calendar's start).
    pub fn period_of(&self, t_ms: i64, event: &Event) -> i64 {
        self.period_in(self.zone.of(event), t_ms)
    }

    /// When the period after the one `t_ms` falls in starts, in `tz` (milliseconds since 1970):
    /// the next local midnight, Monday or first of the month. A midnight that does not exist
    /// (clocks going forward) is taken an hour later.
    pub fn next_start_in(&self, tz: chrono_tz::Tz, t_ms: i64) -> i64 {
        let utc = DateTime::<Utc>::from_timestamp_millis(t_ms).unwrap_or_default();
        let date = utc.with_timezone(&tz).date_naive();
        let next = match self.period {
            Period::Day => date + TimeDelta::days(1),
            Period::Week => date.week(Weekday::Mon).last_day() + TimeDelta::days(1),
            Period::Month => {
                let (y, m) = (date.year(), date.month());
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                chrono::NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(date)
            }
        };
        let midnight = next.and_time(NaiveTime::MIN);
        tz.from_local_datetime(&midnight)
            .earliest()
            .or_else(|| {
                tz.from_local_datetime(&(midnight + TimeDelta::hours(1)))
                    .earliest()
            })
            .map_or(t_ms, |t| t.timestamp_millis())
    }

    /// The period the instant `t_ms` falls in, in `tz` (see [`Calendar::period_of`]).
    pub fn period_in(&self, tz: chrono_tz::Tz, t_ms: i64) -> i64 {
        let utc = DateTime::<Utc>::from_timestamp_millis(t_ms).unwrap_or_default();
        let date = utc.with_timezone(&tz).date_naive();
        match self.period {
            Period::Day => i64::from(date.num_days_from_ce()),
            Period::Week => i64::from(date.week(Weekday::Mon).first_day().num_days_from_ce()) / 7,
            Period::Month => i64::from(date.year()) * 12 + i64::from(date.month0()),
        }
    }
}

/// `[send_window]`: the days and hours, in a zone, when a rule's actions may run.
#[derive(Debug, Clone)]
pub struct SendWindow {
    /// The days it is open, Monday first.
    pub days: [bool; 7],
    /// From (included) and until (excluded), local time.
    pub from: NaiveTime,
    pub until: NaiveTime,
    pub zone: Zone,
}

impl SendWindow {
    /// The day names a rule file uses, Monday first.
    pub const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

    /// `None` if `t_ms` is inside the window where `event`'s user is; else when it next opens
    /// (milliseconds since 1970).
    pub fn next_open(&self, t_ms: i64, event: &Event) -> Option<i64> {
        let tz = self.zone.of(event);
        let now = DateTime::<Utc>::from_timestamp_millis(t_ms)
            .unwrap_or_default()
            .with_timezone(&tz);
        let open_on = |day: Weekday| self.days[day.num_days_from_monday() as usize];
        let time = now.time();
        if open_on(now.weekday()) && time >= self.from && time < self.until {
            return None;
        }
        Some(next_time(&self.days, self.from, tz, t_ms))
    }
}

/// The first moment strictly after `t_ms` that is `at` local time in `tz` on one of `days`
/// (Monday first; a week ahead at most). A time that does not exist that day (clocks going
/// forward) is taken an hour later.
pub fn next_time(days: &[bool; 7], at: NaiveTime, tz: chrono_tz::Tz, t_ms: i64) -> i64 {
    let now = DateTime::<Utc>::from_timestamp_millis(t_ms)
        .unwrap_or_default()
        .with_timezone(&tz);
    (0..=7)
        .filter_map(|d| {
            let date = now.date_naive() + TimeDelta::days(d);
            if !days[date.weekday().num_days_from_monday() as usize] {
                return None;
            }
            let local = date.and_time(at);
            let at = tz.from_local_datetime(&local).earliest().or_else(|| {
                tz.from_local_datetime(&(local + TimeDelta::hours(1)))
                    .earliest()
            })?;
            (at > now).then(|| at.timestamp_millis())
        })
        .next()
        .unwrap_or(t_ms.saturating_add(7 * 86_400_000))
}

/// Every time-zone name tripline knows, for "did you mean".
pub fn zone_names() -> impl Iterator<Item = &'static str> {
    chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::{BodyLimits, decode};

    fn event(zone: Option<&str>) -> Event {
        let person = zone.map_or("{}".into(), |z| format!(r#"{{"$geoip_time_zone":"{z}"}}"#));
        let body =
            format!(r#"{{"event":"e","distinct_id":"d","person":{{"properties":{person}}}}}"#);
        decode(body.as_bytes(), Utc::now(), &BodyLimits::LOCAL_FILES)
            .unwrap()
            .remove(0)
    }

    fn ms(t: &str) -> i64 {
        t.parse::<DateTime<Utc>>().unwrap().timestamp_millis()
    }

    fn fixed(period: Period, zone: &str) -> Calendar {
        Calendar {
            period,
            zone: Zone::Fixed(zone.parse().unwrap()),
        }
    }

    #[test]
    fn a_day_is_the_local_day_across_the_clock_changes() {
        let e = event(None);
        let paris = fixed(Period::Day, "Europe/Paris");
        // 2026-03-29: clocks go forward at 02:00 in Paris (UTC+1 → UTC+2).
        let before = paris.period_of(ms("2026-03-28T22:59:00Z"), &e); // 23:59 on the 28th
        let first = paris.period_of(ms("2026-03-28T23:00:00Z"), &e); // 00:00 on the 29th
        let last = paris.period_of(ms("2026-03-29T21:59:00Z"), &e); // 23:59 (UTC+2)
        let next = paris.period_of(ms("2026-03-29T22:00:00Z"), &e); // 00:00 on the 30th
        assert_eq!((first - before, last - first, next - last), (1, 0, 1));
        // 2026-11-01: New York goes back at 02:00 (UTC-4 → UTC-5): a 25-hour day.
        let ny = fixed(Period::Day, "America/New_York");
        let first = ny.period_of(ms("2026-11-01T04:00:00Z"), &e); // 00:00 (UTC-4)
        let last = ny.period_of(ms("2026-11-02T04:59:00Z"), &e); // 23:59 (UTC-5)
        let next = ny.period_of(ms("2026-11-02T05:00:00Z"), &e);
        assert_eq!((last - first, next - last), (0, 1));
    }

    #[test]
    fn the_next_period_starts_at_local_midnight() {
        let paris = |p| fixed(p, "Europe/Paris");
        let tz: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
        // Wednesday 3 December 2026, 23:30 in Paris.
        let t = ms("2026-12-03T22:30:00Z");
        assert_eq!(
            paris(Period::Day).next_start_in(tz, t),
            ms("2026-12-03T23:00:00Z")
        );
        assert_eq!(
            paris(Period::Week).next_start_in(tz, t),
            ms("2026-12-06T23:00:00Z")
        );
        assert_eq!(
            paris(Period::Month).next_start_in(tz, t),
            ms("2026-12-31T23:00:00Z")
        );
        // The night the clocks go forward (29 March 2026) is an hour shorter.
        let t = ms("2026-03-28T12:00:00Z");
        assert_eq!(
            paris(Period::Day).next_start_in(tz, t),
            ms("2026-03-28T23:00:00Z")
        );
        assert_eq!(
            paris(Period::Day).next_start_in(tz, ms("2026-03-29T12:00:00Z")),
            ms("2026-03-29T22:00:00Z")
        );
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let e = event(None);
        let week = fixed(Period::Week, "UTC");
        // 2026-03-01 is a Sunday, 2026-03-02 a Monday.
        let sunday = week.period_of(ms("2026-03-01T23:00:00Z"), &e);
        let monday = week.period_of(ms("2026-03-02T00:00:00Z"), &e);
        let next_sunday = week.period_of(ms("2026-03-08T23:59:00Z"), &e);
        assert_eq!((monday - sunday, next_sunday - monday), (1, 0));
        let month = fixed(Period::Month, "Asia/Tokyo");
        // 2026-01-31T15:00Z is already February 1st in Tokyo (UTC+9).
        let jan = month.period_of(ms("2026-01-31T14:59:00Z"), &e);
        let feb = month.period_of(ms("2026-01-31T15:00:00Z"), &e);
        let dec = month.period_of(ms("2025-12-15T00:00:00Z"), &e);
        assert_eq!((feb - jan, jan - dec), (1, 1));
    }

    #[test]
    fn a_send_window_opens_on_its_next_day_and_hour_in_its_zone() {
        let window = SendWindow {
            days: [true, true, true, true, true, false, false],
            from: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            until: NaiveTime::from_hms_opt(18, 0, 0).unwrap(),
            zone: Zone::Fixed("Europe/Paris".parse().unwrap()),
        };
        let e = event(None);
        // Tuesday 2026-03-03 10:00 in Paris (09:00 UTC): open.
        assert_eq!(window.next_open(ms("2026-03-03T09:00:00Z"), &e), None);
        // Tuesday 07:30 in Paris: today at 09:00 (08:00 UTC).
        assert_eq!(
            window.next_open(ms("2026-03-03T06:30:00Z"), &e),
            Some(ms("2026-03-03T08:00:00Z"))
        );
        // Friday 18:00 in Paris: closed until Monday 09:00.
        assert_eq!(
            window.next_open(ms("2026-03-06T17:00:00Z"), &e),
            Some(ms("2026-03-09T08:00:00Z"))
        );
        // Saturday 2026-03-28, and the clocks go forward on Sunday: Monday 09:00 is 07:00 UTC.
        assert_eq!(
            window.next_open(ms("2026-03-28T12:00:00Z"), &e),
            Some(ms("2026-03-30T07:00:00Z"))
        );
    }

    #[test]
    fn a_zone_from_the_event_falls_back_when_missing_or_unknown() {
        let zone = Zone::Field {
            path: FieldPath::parse("person.properties.$geoip_time_zone").unwrap(),
            fallback: "Europe/Paris".parse().unwrap(),
        };
        assert_eq!(
            zone.of(&event(Some("America/New_York"))).name(),
            "America/New_York"
        );
        assert_eq!(zone.of(&event(None)).name(), "Europe/Paris");
        assert_eq!(zone.of(&event(Some("Mars/Olympus"))).name(), "Europe/Paris");
    }
}

//! Convenience accessors for MSH fields and the patient identifier.
//!
//! All accessors return `None` when the field (or component) is absent or
//! empty. They return the zero-copy [`Field`]/[`Component`] so the caller
//! chooses between the exact raw bytes ([`Field::raw`], right for keys such
//! as sender + control id, whatever the charset) and decoded text
//! ([`Field::decoded_str`]).

use crate::message::{Component, Field, Message};

fn non_empty_field(f: Option<Field<'_>>) -> Option<Field<'_>> {
    f.filter(|f| !f.is_empty())
}

fn non_empty_component(c: Option<Component<'_>>) -> Option<Component<'_>> {
    c.filter(|c| !c.is_empty())
}

/// The patient identifier from PID-3's first repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatientIdentifier<'a> {
    /// PID-3.1, the ID number (e.g. an MRN).
    pub id: Component<'a>,
    /// PID-3.4, the assigning authority (HD: may have subcomponents
    /// `namespace&universal id&type`), if present.
    pub assigning_authority: Option<Component<'a>>,
}

impl PatientIdentifier<'_> {
    /// A stable byte key `authority` + 0x1F + `id` (raw bytes), suitable as
    /// an ordering/partition key. The separator (ASCII unit separator)
    /// cannot be confused with ordinary content.
    pub fn key(&self) -> Vec<u8> {
        let authority = self
            .assigning_authority
            .map(|a| a.raw())
            .unwrap_or_default();
        let mut key = Vec::with_capacity(
            authority
                .len()
                .saturating_add(self.id.raw().len())
                .saturating_add(1),
        );
        key.extend_from_slice(authority);
        key.push(0x1F);
        key.extend_from_slice(self.id.raw());
        key
    }
}

impl<'a> Message<'a> {
    /// MSH field `n` (HL7 numbering), `None` if absent or empty.
    pub fn msh_field(&self, n: usize) -> Option<Field<'a>> {
        non_empty_field(self.msh().field(n))
    }

    /// MSH-3 sending application (whole HD field).
    pub fn sending_application(&self) -> Option<Field<'a>> {
        self.msh_field(3)
    }

    /// MSH-4 sending facility (whole HD field).
    pub fn sending_facility(&self) -> Option<Field<'a>> {
        self.msh_field(4)
    }

    /// MSH-5 receiving application (whole HD field).
    pub fn receiving_application(&self) -> Option<Field<'a>> {
        self.msh_field(5)
    }

    /// MSH-6 receiving facility (whole HD field).
    pub fn receiving_facility(&self) -> Option<Field<'a>> {
        self.msh_field(6)
    }

    /// MSH-7 date/time of message (raw TS/DTM text, e.g. `20261102083015`).
    pub fn date_time(&self) -> Option<Field<'a>> {
        self.msh_field(7)
    }

    /// MSH-9.1 message type, e.g. `ADT`.
    pub fn message_type(&self) -> Option<Component<'a>> {
        non_empty_component(self.msh().field(9)?.component(1))
    }

    /// MSH-9.2 trigger event, e.g. `A01`.
    pub fn trigger_event(&self) -> Option<Component<'a>> {
        non_empty_component(self.msh().field(9)?.component(2))
    }

    /// MSH-9.3 message structure, e.g. `ADT_A01`.
    pub fn message_structure(&self) -> Option<Component<'a>> {
        non_empty_component(self.msh().field(9)?.component(3))
    }

    /// MSH-10 message control id.
    pub fn control_id(&self) -> Option<Field<'a>> {
        self.msh_field(10)
    }

    /// MSH-11.1 processing id (`P`, `T`, `D`).
    pub fn processing_id(&self) -> Option<Component<'a>> {
        non_empty_component(self.msh().field(11)?.component(1))
    }

    /// MSH-12.1 version id, e.g. `2.5.1`.
    pub fn version(&self) -> Option<Component<'a>> {
        non_empty_component(self.msh().field(12)?.component(1))
    }

    /// MSH-12.1 as `(major, minor)`, e.g. `(2, 5)` for `2.5.1`.
    pub fn version_number(&self) -> Option<(u32, u32)> {
        parse_version(self.version()?.raw())
    }

    /// MSH-15 accept acknowledgment type (`AL`, `NE`, `ER`, `SU`).
    pub fn accept_ack_type(&self) -> Option<Field<'a>> {
        self.msh_field(15)
    }

    /// MSH-16 application acknowledgment type (`AL`, `NE`, `ER`, `SU`).
    pub fn application_ack_type(&self) -> Option<Field<'a>> {
        self.msh_field(16)
    }

    /// MSH-18 character set, first repetition (the default character set
    /// of the message), e.g. `UNICODE UTF-8`.
    pub fn character_set(&self) -> Option<Component<'a>> {
        non_empty_component(self.msh().field(18)?.component(1))
    }

    /// True if the message declares UTF-8: MSH-18 (first repetition) is
    /// `UNICODE UTF-8` (`UTF-8` and `UTF8` are accepted too,
    /// case-insensitively).
    ///
    /// Tolerance: when MSH-18 is empty, the exact table 0211 value
    /// `UNICODE UTF-8` in MSH-19 or MSH-20 also counts. Some senders shift
    /// it by one or two fields (the sample fixtures `utf8_names` and
    /// `invalid_utf8` put it in MSH-20); neither field can legitimately
    /// hold that value (MSH-19 is a language code, MSH-20 a table 0356
    /// scheme), so the sender's intent is unambiguous.
    /// [`Message::character_set`] itself stays strictly MSH-18.
    pub fn declares_utf8(&self) -> bool {
        match self.character_set() {
            Some(c) => {
                let v = c.raw().trim_ascii();
                v.eq_ignore_ascii_case(b"UNICODE UTF-8")
                    || v.eq_ignore_ascii_case(b"UTF-8")
                    || v.eq_ignore_ascii_case(b"UTF8")
            }
            None => [19, 20].into_iter().any(|n| {
                self.msh()
                    .field(n)
                    .and_then(|f| f.component(1))
                    .is_some_and(|c| c.raw().trim_ascii().eq_ignore_ascii_case(b"UNICODE UTF-8"))
            }),
        }
    }

    /// PID-3 first repetition: ID (component 1) and assigning authority
    /// (component 4). `None` if there is no PID or PID-3.1 is empty.
    pub fn patient_identifier(&self) -> Option<PatientIdentifier<'a>> {
        let rep = self.field("PID", 3)?.repetition(1)?;
        let id = non_empty_component(rep.component(1))?;
        Some(PatientIdentifier {
            id,
            assigning_authority: non_empty_component(rep.component(4)),
        })
    }
}

/// Parses `2.5.1` → `(2, 5)`.
pub(crate) fn parse_version(raw: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version(b"2.5.1"), Some((2, 5)));
        assert_eq!(parse_version(b"2.3"), Some((2, 3)));
        assert_eq!(parse_version(b"3"), Some((3, 0)));
        assert_eq!(parse_version(b"x"), None);
        assert_eq!(parse_version(b""), None);
    }

    #[test]
    fn accessors_none_when_empty() {
        let m = Message::parse(b"MSH|^~\\&||FAC|||||^A01").unwrap();
        assert!(m.sending_application().is_none());
        assert_eq!(m.sending_facility().unwrap().raw(), b"FAC");
        assert!(m.message_type().is_none());
        assert_eq!(m.trigger_event().unwrap().raw(), b"A01");
        assert!(m.control_id().is_none());
        assert!(m.patient_identifier().is_none());
        assert!(!m.declares_utf8());
    }

    #[test]
    fn utf8_declaration_positions() {
        let msh = |tail: &str| format!("MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5{tail}");
        let declares = |tail: &str| {
            Message::parse(msh(tail).as_bytes())
                .unwrap()
                .declares_utf8()
        };
        assert!(declares("||||||UNICODE UTF-8"));
        assert!(declares("||||||utf-8~8859/1"));
        assert!(!declares("||||||8859/1"));
        assert!(declares("||||||||UNICODE UTF-8"), "shifted to MSH-20");
        assert!(declares("|||||||UNICODE UTF-8"), "shifted to MSH-19");
        assert!(!declares("||||||8859/1||UNICODE UTF-8"), "MSH-18 wins");
        assert!(
            !declares("||||||||UTF-8"),
            "only the exact 0211 value when shifted"
        );
        assert!(!declares(""));
    }

    #[test]
    fn patient_key() {
        let m = Message::parse(b"MSH|^~\\&\rPID|||123^^^AUTH&1.2&ISO").unwrap();
        let p = m.patient_identifier().unwrap();
        assert_eq!(p.id.raw(), b"123");
        assert_eq!(p.assigning_authority.unwrap().raw(), b"AUTH&1.2&ISO");
        assert_eq!(p.key(), b"AUTH&1.2&ISO\x1f123".to_vec());
    }
}

//! IST0106 SchemaValidationError, IST0133 SchemaWarning and TRL0001 SkippedKind: the
//! diagnostics of loading and validation, reported as analysis messages.

use super::{Message, codes};
use crate::load::Parsed;
use crate::resource::{Diagnostic, Level};

/// Every loading/validation error becomes one IST0106, every warning one IST0133, and every
/// note (a document of a kind Trellis does not read, skipped) one TRL0001 SkippedKind.
pub(super) fn analyze(parsed: &[Parsed], out: &mut Vec<Message>) {
    for d in parsed.iter().flat_map(|p| &p.diagnostics) {
        out.push(from_diagnostic(d));
    }
}

fn from_diagnostic(d: &Diagnostic) -> Message {
    let detail = if d.path.is_empty() {
        d.message.clone()
    } else {
        format!("{}: {}", d.path, d.message)
    };
    let (t, text) = match d.level {
        Level::Error => (
            codes::SCHEMA_VALIDATION_ERROR,
            format!("Schema validation error: {detail}"),
        ),
        Level::Warning => (
            codes::SCHEMA_WARNING,
            format!("Schema validation warning: {detail}"),
        ),
        Level::Info => (codes::SKIPPED_KIND, d.message.clone()),
    };
    Message::new(t, d.object.clone(), Some(d.location.clone()), text)
}

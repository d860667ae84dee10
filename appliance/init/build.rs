//! Links `bootbox-init` as a fully static executable with plain `cargo build`, on the stable
//! x86_64-unknown-linux-gnu toolchain, without touching other crates' flags.
//!
//! `-C target-feature=+crt-static` cannot be set for a single crate from its own manifest on
//! stable cargo, and without it rustc asks for the dynamic `libgcc_s` and `libc` with
//! `-Wl,-Bdynamic -lgcc_s ... -lc`. So this script:
//! 1. writes tiny linker scripts named `libgcc_s.so`, `libc.so` and `libm.so` into a private
//!    directory, each naming the *static* archives (`libc.a`, `libgcc_eh.a`, `libgcc.a`,
//!    `libm.a`, located with `cc -print-file-name`);
//! 2. puts that directory first on the binary's library search path (`-L`), so `-lgcc_s`,
//!    `-lc` and `-lm` resolve to those scripts even in `-Bdynamic` mode;
//! 3. links the binary with `-static -no-pie` (no `PT_INTERP`, `crt1.o` start files).
//!
//! All flags use `rustc-link-arg-bins`, so they apply only to this crate's binary.

use std::path::PathBuf;
use std::process::Command;

fn print_file_name(cc: &str, name: &str) -> PathBuf {
    let out = Command::new(cc)
        .arg(format!("-print-file-name={name}"))
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            if p.is_absolute() && p.exists() {
                return p;
            }
            panic!(
                "bootbox-init needs the static {name} to link statically; install libc6-dev (Debian) or glibc-static (Fedora)"
            );
        }
        _ => panic!("bootbox-init: cannot run `{cc} -print-file-name={name}`; install a C compiler (gcc) and libc6-dev"),
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.contains("linux-gnu") {
        // musl targets are static already; nothing to do.
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let libc_a = print_file_name(&cc, "libc.a");
    let libm_a = print_file_name(&cc, "libm.a");
    let gcc_eh = print_file_name(&cc, "libgcc_eh.a");
    let gcc = print_file_name(&cc, "libgcc.a");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out.join("static-libs");
    std::fs::create_dir_all(&dir).expect("create OUT_DIR/static-libs");
    let (c, m, eh, g) = (
        libc_a.display(),
        libm_a.display(),
        gcc_eh.display(),
        gcc.display(),
    );
    let scripts = [
        ("libc.so", format!("GROUP({c} {eh} {g})\n")),
        ("libgcc_s.so", format!("GROUP({eh} {g} {c})\n")),
        ("libm.so", format!("INPUT({m})\n")),
    ];
    for (name, text) in scripts {
        std::fs::write(dir.join(name), text).expect("write linker script");
    }
    println!("cargo:rustc-link-arg-bins=-L{}", dir.display());
    println!("cargo:rustc-link-arg-bins=-no-pie");
    println!("cargo:rustc-link-arg-bins=-static");
    // The init is copied into every appliance and unpacked on every boot: leave out DWARF
    // (symbol names stay, so panic messages still name functions).
    println!("cargo:rustc-link-arg-bins=-Wl,--strip-debug");
}

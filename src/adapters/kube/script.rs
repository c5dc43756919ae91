//! The shell scripts sent to a pod: one that starts a command in its own process group and
//! reports the group, and one that stops such a group.
//!
//! Closing an exec stream does not stop the process in the container (the kubelet leaves it
//! running), so every command is started under `setsid` and its process group id is the first
//! line of its stdout; stopping it is a second exec that signals that group.

use std::time::Duration;

/// Quotes a string for a POSIX shell: inside single quotes nothing is special but `'` itself.
pub fn quote(raw: &str) -> String {
    format!("'{}'", raw.replace('\'', r"'\''"))
}

/// `sh -c` script: cd into `workdir`, export `env`, run `command` under `setsid` in the
/// background (a background child is never a group leader, so `setsid` needs no fork and
/// `$!` is the new group's id), print that id first, wait for it, and kill whatever of the
/// group outlived the shell (as the local executor does) so it cannot hold the streams open.
pub fn start(command: &str, workdir: &str, env: &[(String, String)]) -> String {
    let mut script = format!("cd -- {} || exit 1\n", quote(workdir));
    for (name, value) in env {
        // Names were validated as [A-Za-z_][A-Za-z0-9_]*: safe unquoted.
        script.push_str(&format!("export {name}={}\n", quote(value)));
    }
    script.push_str(&format!(
        "setsid sh -c 'echo $$; exec sh -c \"$1\"' rdev {} &\n\
         g=$!\n\
         wait $g\n\
         s=$?\n\
         kill -KILL -$g 2>/dev/null\n\
         exit $s\n",
        quote(command)
    ));
    script
}

/// A script at most this long goes in the exec request's query string (as `command=` values,
/// percent-encoded to at most three times that); a longer one goes through stdin. Proxies in
/// front of API servers commonly refuse request lines past 8 KiB, and a command may be 64 KiB
/// with 4 MiB of environment.
pub const MAX_INLINE_SCRIPT: usize = 2048;

/// `sh -c` script that reads a script of `len` bytes from stdin and runs it. `head -c` stops
/// at `len` bytes, so it needs no end of input (the v4 exec protocol cannot close stdin).
pub fn from_stdin(len: usize) -> String {
    format!("s=$(head -c {len}) && eval \"$s\"")
}

/// `sh -c` script: SIGTERM to group `pgid`, SIGKILL after `grace` if any member is left, and
/// exit 0 only when no member is alive. A zombie counts as gone: it runs nothing, and a
/// container's PID 1 may never reap it.
pub fn stop(pgid: i32, grace: Duration) -> String {
    let ticks = (grace.as_millis() / 100).max(1);
    format!(
        "g={pgid}\n\
         alive() {{\n\
           for f in /proc/[0-9]*/stat; do\n\
             read -r l < \"$f\" 2>/dev/null || continue\n\
             l=${{l##*) }}\n\
             set -- $l\n\
             [ \"$1\" != Z ] && [ \"$3\" = \"$g\" ] && return 0\n\
           done\n\
           return 1\n\
         }}\n\
         kill -TERM -$g 2>/dev/null\n\
         i=0\n\
         while alive && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done\n\
         if alive; then kill -KILL -$g 2>/dev/null; sleep 0.1; fi\n\
         if alive; then echo \"process group $g survived SIGKILL\" >&2; exit 1; fi\n\
         exit 0\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str) -> std::process::Output {
        Command::new("sh").arg("-c").arg(script).output().unwrap()
    }

    #[test]
    fn quoting_survives_every_special_character() {
        for raw in ["plain", "it's", "$HOME `x` \"y\" \\ ; | & * ?", "a\nb", ""] {
            let out = sh(&format!("printf %s {}", quote(raw)));
            assert_eq!(String::from_utf8(out.stdout).unwrap(), raw);
        }
    }

    #[test]
    fn start_prints_the_group_first_then_runs_in_workdir_with_env() {
        let env = vec![("GREETING".to_owned(), "it's \"hi\" $x".to_owned())];
        let out = sh(&start(
            "pwd; echo \"$GREETING\"; echo e >&2; exit 3",
            "/tmp",
            &env,
        ));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines();
        let pgid: i32 = lines.next().unwrap().parse().unwrap();
        assert!(pgid > 1);
        assert_eq!(lines.collect::<Vec<_>>(), ["/tmp", "it's \"hi\" $x"]);
        assert_eq!(out.stderr, b"e\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn a_script_read_from_stdin_runs_as_if_it_were_inline() {
        let env = vec![("BIG".to_owned(), "x".repeat(10_000))];
        let script = start("echo ${#BIG}; echo 'it''s'; exit 4", "/tmp", &env);
        assert!(script.len() > MAX_INLINE_SCRIPT);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(from_stdin(script.len()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Stdin stays open after the script, as a v4 exec stream's does.
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<_> = stdout.lines().skip(1).collect();
        assert_eq!(lines, ["10000", "its"]);
        assert_eq!(out.status.code(), Some(4));
    }

    #[test]
    fn a_missing_workdir_fails_before_the_group_is_printed() {
        let out = sh(&start("echo never", "/definitely/not/here", &[]));
        assert!(out.stdout.is_empty());
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("/definitely/not/here"));
    }

    #[test]
    fn stop_ends_the_whole_group_even_a_child_ignoring_sigterm() {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(start("trap '' TERM; sleep 30 & sleep 30", "/", &[]))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut first,
        )
        .unwrap();
        let pgid: i32 = first.trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let out = sh(&stop(pgid, Duration::from_millis(300)));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        child.wait().unwrap();
    }
}

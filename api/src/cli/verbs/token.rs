//! `token create NAME --role R [--vm GLOB ...]`, `token list`, `token revoke ID`.

use clap::Subcommand;

use crate::cli::client::{encode, Client};
use crate::cli::table::{show, when};
use crate::wire::tokens::{CreateToken, CreatedToken, Role, TokenInfo};

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token (its secret is printed once).
    Create {
        name: String,
        /// admin, operator, auditor or scoped.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// For scoped tokens: VM names or globs.
        #[arg(long = "vm")]
        vms: Vec<String>,
    },
    /// Every token (never its secret).
    List,
    /// Revoke a token: it is refused at once.
    Revoke { id: String },
}

/// `admin`, `operator`, `auditor` or `scoped`.
fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "admin" => Ok(Role::Admin),
        "operator" => Ok(Role::Operator),
        "auditor" => Ok(Role::Auditor),
        "scoped" => Ok(Role::Scoped),
        _ => Err(format!(
            "{s:?} is not a role: admin, operator, auditor or scoped"
        )),
    }
}

/// Runs a `token` verb.
pub async fn run(c: &Client, cmd: TokenCmd, as_json: bool) -> anyhow::Result<i32> {
    match cmd {
        TokenCmd::Create { name, role, vms } => {
            let req = CreateToken { name, role, vms };
            let v = c.post::<CreatedToken>("/tokens", &req).await?;
            show(&v, as_json, |t| {
                println!("{}\n(shown once: store it now; id {})", t.token, t.info.id)
            });
        }
        TokenCmd::List => {
            let v = c.get::<Vec<TokenInfo>>("/tokens").await?;
            show(&v, as_json, |l| table(l));
        }
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/tokens/{}", encode(&id))).await?;
            println!("token {id} revoked");
        }
    }
    Ok(0)
}

fn table(list: &[TokenInfo]) {
    println!(
        "{:<14} {:<20} {:<9} {:<21} VMS",
        "ID", "NAME", "ROLE", "CREATED"
    );
    for t in list {
        println!(
            "{:<14} {:<20} {:<9} {:<21} {}",
            t.id,
            t.name,
            t.role,
            when(Some(t.created)),
            t.vms.join(",")
        );
    }
}

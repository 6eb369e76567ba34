//! The work of the benchmark's JSON function, shared by the guest
//! (`bench/guests/json`) and the native peer (`bench/native-hello`) so both
//! do exactly the same thing: parse a batch of orders, total each one, and
//! answer with the revenue, the five largest orders and a total per
//! customer.

use serde_json::{Map, Value, json};

/// Transforms an order batch; a body that is not one answers with why.
pub fn transform(body: &[u8]) -> Result<Vec<u8>, String> {
    let input: Value = serde_json::from_slice(body).map_err(|e| format!("invalid json: {e}"))?;
    let orders = input
        .get("orders")
        .and_then(Value::as_array)
        .ok_or("expected an object with an `orders` array")?;
    let mut totals = Vec::with_capacity(orders.len());
    let mut customers = Map::new();
    for order in orders {
        let total: f64 = order
            .get("items")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        let qty = i.get("qty").and_then(Value::as_f64).unwrap_or(0.0);
                        let price = i.get("price").and_then(Value::as_f64).unwrap_or(0.0);
                        qty * price
                    })
                    .sum()
            })
            .unwrap_or(0.0);
        let customer = order
            .get("customer")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_uppercase();
        let sum = customers
            .get(&customer)
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        customers.insert(customer, json!(round(sum + total)));
        totals.push((order.get("id").cloned().unwrap_or(Value::Null), total));
    }
    let revenue = round(totals.iter().map(|(_, t)| t).sum());
    totals.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<Value> = totals
        .iter()
        .take(5)
        .map(|(id, total)| json!({ "id": id, "total": round(*total) }))
        .collect();
    let out = json!({
        "count": orders.len(),
        "revenue": revenue,
        "top": top,
        "customers": customers,
    });
    serde_json::to_vec(&out).map_err(|e| e.to_string())
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_orders_and_customers() {
        let body = br#"{"orders":[
            {"id":1,"customer":"ada","items":[{"sku":"a","qty":2,"price":1.5}]},
            {"id":2,"customer":"bob","items":[{"sku":"b","qty":1,"price":10}]},
            {"id":3,"customer":"ada","items":[]}]}"#;
        let out: Value = serde_json::from_slice(&transform(body).unwrap()).unwrap();
        assert_eq!(out["count"], 3);
        assert_eq!(out["revenue"], 13.0);
        assert_eq!(out["top"][0]["id"], 2);
        assert_eq!(out["customers"]["ADA"], 3.0);
    }

    #[test]
    fn refuses_what_is_not_an_order_batch() {
        assert!(transform(b"[1,2]").unwrap_err().contains("orders"));
        assert!(transform(b"{").unwrap_err().contains("invalid json"));
    }
}
